"""The IPython magics: ``%vllm_load``, ``%%vllm`` and friends.

Routing: each magic reads its line (:mod:`.args`; ``vllm serve`` flags through
:mod:`vllm_magic.engine.flags`), calls the engine session (:mod:`vllm_magic.engine`) and reports
in a line or two; a ``%%vllm`` cell's body becomes prompts in :mod:`.cells` and its answer streams
through :mod:`.answer`. Every user mistake is an ``IPython.core.error.UsageError`` (one line, no
traceback): the package's own errors are turned into one in this package, never above it. The
kernel and the engine stay usable.
"""

from __future__ import annotations

import time
from contextlib import closing
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Enum, Float, Unicode, link

from ..engine.flags import (MagicLine, format_duration, hub_flags, load_flags, parse_duration, parser_flags,
                            remote_flags, serve_flags)
from ..engine.requests.grid import parse_grid_flag
from ..engine.requests.sampling import DEFAULTS_FIELDS, SamplingTraits
from ..engine.session import EngineSession, get_session
from ..hub import directory_size, format_bytes
from .answer import display_code, display_widget, stream_results, usage_errors
from .args import parse_line, sampling_args, sampling_overrides, split_vllm_line
from .cells import PromptError, interpolate, parse_choices, resolve_json_schema, split_batch
from .display import FORMATS, GridProgress, LoadProgress, supports_updates

__all__ = ["VllmMagics", "register", "unregister"]


#: A cell of more prompts than this (a ``---`` batch) may show each answer once it is complete: a
#: ``--remote`` server then sends the batch whole, in one request (an engine in this kernel streams anyway).
STREAMED_PROMPTS = 8
#: Alternatives per token that ``--explore`` asks for when the cell gives no ``--logprobs``.
EXPLORER_ALTERNATIVES = 5


@magics_class
class VllmMagics(Magics, SamplingTraits):
    """vLLM in the notebook: one engine per kernel, prompts in cells.

    Sampling defaults are configurable (``%config VllmMagics.temperature = 0.2``) and shared with
    the sampling widgets and the LangChain objects: the traits are those of the session's
    ``SamplingDefaults``, linked both ways.
    """

    # Behaviour of the magics themselves.
    show_controls = Bool(True, help="Show the sampling panel under %vllm_load.").tag(config=True)
    output_format = Enum(FORMATS, default_value="markdown",
                         help="How %%vllm renders answers when --format is not given.").tag(config=True)
    stream_interval = Float(0.05, help="Seconds between two refreshes of a streaming answer.").tag(config=True)
    langchain_name = Unicode("llm", help="Variable name of the LangChain object (%vllm_load --as NAME).")

    def __init__(self, shell: Any = None, session: EngineSession | None = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session = session if session is not None else get_session()
        #: The messages of the ``%%vllm --continue`` conversation (``%vllm_reset`` clears it).
        self.conversation: list[dict[str, str]] = []
        self._links = self._link_defaults()

    def _link_defaults(self) -> list[link]:
        # The session's current values win (widgets may already have changed them), except for the
        # traits that the IPython configuration sets explicitly.
        configured = {name: getattr(self, name) for name in DEFAULTS_FIELDS
                      if name in self.config.get(type(self).__name__, {})}
        links = [link((self.session.defaults, name), (self, name)) for name in DEFAULTS_FIELDS]
        for name, value in configured.items():
            setattr(self, name, value)
        return links

    def close(self) -> None:
        """Stop mirroring the session's defaults and leave ``%config`` (the extension is unloaded)."""
        configurables = getattr(self.shell, "configurables", [])
        if self in configurables:
            configurables.remove(self)
        for item in getattr(self, "_links", []):
            try:
                item.unlink()
            except Exception:
                pass
        self._links = []

    # ----- engine lifecycle ---------------------------------------------------------------------
    @magic_arguments()
    @argument("model", nargs="?", help="Hugging Face model id or local directory; none: the demo model.")
    @argument("--as", dest="as_name", metavar="NAME", default="llm",
              help="Variable name of the LangChain LLM over this engine (default: llm).")
    @argument("--verbose", action="store_true", help="Show vLLM's own logs in the cell.")
    @argument("--no-controls", action="store_true", help="Do not show the sampling panel after loading.")
    @argument("--remote", metavar="URL", help="Use the vLLM server at URL instead of an engine in this kernel "
              "(MODEL or --model: which of its models; default: the first).")
    @argument("--api-key", metavar="KEY", help="The API key of the --remote server.")
    @argument("--keep", action="store_true", help="Put the engine loaded now to sleep instead of unloading it "
              "(GPU): a later %%vllm_load of it wakes it in seconds. %%vllm_status lists sleeping engines.")
    @argument("--persist", action="store_true", help="Run the engine in a process of its own that outlives the "
              "kernel: after a restart, %%vllm_load of it attaches in a moment. It ends after --idle-timeout with no "
              "kernel attached, or with %%vllm_unload --stop.")
    @argument("--idle-timeout", metavar="DURATION", help="How long a --persist engine waits with no kernel attached "
              "and no request before it ends: 90s, 15m (default), 2h, or never.")
    @argument("--embed", action="store_true", help="Load MODEL (none: the demo model) as the embedding engine, "
              "beside the generation engine and without touching it (session.embed, VLLMEmbeddings); with "
              "--remote, use the server's embeddings.")
    @argument("engine_flags", nargs="*", metavar="ENGINE FLAGS",
              help="Any `vllm serve` engine flag, same spelling: --max-model-len 2048, --dtype float16, "
                   "--tensor-parallel-size 2, --quantization awq, --enforce-eager, ... "
                   "(run `vllm serve --help` for the full list); and --concurrency N, the full-length "
                   "sequences a GPU engine's KV cache holds (default 16).")
    @line_magic
    def vllm_load(self, line: str = "") -> None:
        """Load a model into the kernel's engine, or reuse it when it is already loaded.

        Loading shows one progress line, then a one-line summary; vLLM's log goes to a file
        (``%vllm_log``). Re-running the same cell says "already loaded" at once. The live engine is
        kept when it runs the model with every flag given (flags left out keep its values); another
        model or another value shuts it down first.

        On an NVIDIA GPU the engine takes what it needs, so that notebooks can share the card: a KV
        cache for ``--concurrency`` (default 16) sequences of the full context, at most half the
        memory free after the weights. ``--gpu-memory-utilization 0.9`` sizes it as ``vllm serve``
        does (90% of the card); ``--kv-cache-memory-bytes 8G`` sets the KV cache. A model that does
        not fit says so in one line: what is free, who holds the rest, what to pass.

        With ``--keep`` (NVIDIA GPU) the engine loaded now goes to sleep instead of being shut
        down: its weights wait in host RAM and a later ``%vllm_load`` of it wakes it in seconds.
        One engine is awake at a time; at most two sleep (the oldest beyond is unloaded); when host
        RAM cannot hold the weights, the engine sleeps at level 2 (weights reloaded on waking) or
        is unloaded, and the load says so. ``%vllm_unload`` frees them all.

        With ``--persist`` the engine runs in a process of its own, reached over a socket only this
        user can open, and outlives the kernel: after Restart Kernel, the same ``%vllm_load`` attaches
        to it in a fraction of a second, and other kernels of this user attach to it too (one engine,
        their requests batched together). It ends ``--idle-timeout`` (default 15 minutes) after the
        last kernel detached and the last request finished, or with ``%vllm_unload --stop``. Any
        ``%vllm_load`` that a running persisted engine serves attaches to it.

        With ``--remote URL`` the session uses a vLLM server elsewhere (``vllm serve`` on a GPU box,
        a multi-node deployment, ``%vllm_serve``) instead: every cell, widget and LangChain object
        works the same.

        Examples::

            %vllm_load
            %vllm_load HuggingFaceTB/SmolLM2-360M-Instruct --max-model-len 4096
            %vllm_load Qwen/Qwen2.5-7B-Instruct-AWQ --quantization awq --gpu-memory-utilization 0.8
            %vllm_load Qwen/Qwen2.5-7B-Instruct --keep
            %vllm_load Qwen/Qwen2.5-7B-Instruct --persist --idle-timeout 1h
            %vllm_load --remote http://gpu-box:8000 --api-key $KEY
            %vllm_load Qwen/Qwen3-0.6B --reasoning-parser qwen3 --tool-call-parser hermes

        ``--reasoning-parser NAME`` and ``--tool-call-parser NAME`` (``vllm serve``'s spelling) pick
        vLLM's parsers for this session's answers: thinking shows apart from the answer, and
        ``ChatVLLM`` reads tool calls. They are applied here, to the generated text, and are not
        engine flags: changing them never restarts the engine.

        ``--lora-modules NAME=PATH ...`` (``vllm serve``'s spelling, JSON entries too) registers LoRA
        adapters once the engine runs, as ``%vllm_lora NAME PATH`` does; it implies ``--enable-lora``
        and a ``--max-lora-rank`` that takes their ranks.

        With ``--embed`` the model becomes the session's embedding engine instead, beside the
        generation engine (which it never touches): vLLM's pooling runner in this kernel, with the
        same engine flags and the same "already loaded" rule, or ``--embed --remote URL`` for a
        server's embeddings. ``session.embed(texts)``, ``session.score(query, docs)`` and
        ``VLLMEmbeddings`` use it; ``%vllm_unload --embed`` frees it::

            %vllm_load --embed
            %vllm_load --embed BAAI/bge-small-en-v1.5 --max-model-len 512
            %vllm_load --embed --remote http://gpu-box:8001
        """
        args, split = split_vllm_line(self.vllm_load, line)
        if args.embed:
            self._load_embedder(args, split)
            return
        if args.remote:
            _refuse_given(args, "remote", "an engine of this user", "keep", "persist", "idle_timeout")
            self._attach(args, split)
            return
        if args.api_key:
            raise UsageError("--api-key goes with --remote URL (or %vllm_serve)")
        if args.idle_timeout is not None and not args.persist:
            raise UsageError("--idle-timeout says when a --persist engine ends: add --persist")
        with usage_errors():
            idle = "default" if args.idle_timeout is None else parse_duration(args.idle_timeout)
        progress = LoadProgress(supports_updates(self.shell))
        # a bad configuration, vLLM's start failing, the demo model missing: one line each
        with usage_errors("loading interrupted; no engine is loaded (run %vllm_load again)"), closing(progress):
            # The line that started a running persisted engine attaches to it without reading its flags
            # with vLLM's parser: a restarted kernel answers without importing vLLM.
            info = None if args.keep else self.session.attach_persisted(
                split.model, split.vllm, persist=args.persist, idle_timeout=idle, progress=progress)
            if info is None:
                with usage_errors():  # a Hub model's files first: no vLLM import before a download fails
                    model, hub = hub_flags(split.vllm, split.model)
                    if model is not None:
                        self.session.download(model, progress=progress, **hub)
                with usage_errors():  # the session's parsers are not engine flags: choosing one never restarts it
                    flags = load_flags(split.vllm, split.model)
                    engine = {**_adapter_engine_args(flags.adapters, args), **flags.engine}
                info = self.session.load(flags.model, verbose=args.verbose, progress=progress, keep=args.keep,
                                         persist=args.persist, idle_timeout=idle, flag_words=split.vllm,
                                         **engine)
                parsers = flags.parsers
                adapters = flags.adapters
            else:
                with usage_errors():
                    parsers = parser_flags(split.vllm)
                adapters = ()
        self.session.parsers = parsers
        self._loaded(info, args)
        if adapters:
            with usage_errors():  # the engine stays loaded: an adapter it refuses is one line
                registered = [self.session.add_lora(name, path) for name, path in adapters]
            print("✓ adapters " + ", ".join(a.summary for a in registered) + ": %%vllm --lora NAME")

    def _loaded(self, info: Any, args: Any) -> None:
        for line in (getattr(info, "note", None), getattr(info, "kept", None)):
            if line:
                print(line)
        print(("✓ " if not info.already_loaded or getattr(info, "woken", False) else "") + info.summary)
        self.langchain_name = args.as_name
        self._publish_langchain(args.as_name)
        if self.show_controls and not args.no_controls:
            self._show_controls(reuse=info.already_loaded)

    def _attach(self, args: Any, split: MagicLine) -> None:
        """``%vllm_load --remote URL``: attach the session to a vLLM server."""
        with usage_errors():
            flags = remote_flags(split.vllm, split.model)
        if args.verbose:
            print(f"attaching to {args.remote}")
        with usage_errors("attaching interrupted; the session is as it was"):
            info = self.session.connect(args.remote, api_key=args.api_key, model=flags.model)
        self._loaded(info, args)
        self.session.parsers = flags.parsers

    def _load_embedder(self, args: Any, split: MagicLine) -> None:
        """``%vllm_load --embed``: load the session's embedding engine (the generation engine stays)."""
        _refuse_given(args, "embed", "the generation engine", "keep", "persist", "idle_timeout", "as_name")
        if args.api_key and not args.remote:
            raise UsageError("--api-key goes with --remote URL")
        progress = LoadProgress(supports_updates(self.shell))
        with usage_errors("loading interrupted; no embedding engine is loaded (run %vllm_load --embed again)"), \
                closing(progress):
            flags = remote_flags(split.vllm, split.model) if args.remote else load_flags(split.vllm, split.model)
            if flags.parsers.reasoning or flags.parsers.tool_call:
                raise UsageError("parsers read generated text: give them to the generation engine's %vllm_load")
            if flags.adapters:
                raise UsageError("LoRA adapters change what a model generates: give --lora-modules to the "
                                 "generation engine's %vllm_load")
            info = self.session.load_embedder(flags.model, url=args.remote, api_key=args.api_key, verbose=args.verbose,
                                              progress=progress, **flags.engine)
        print(("" if info.already_loaded else "✓ ") + info.summary)

    def _publish_langchain(self, name: str) -> None:
        """Put a LangChain LLM over the live engine into the namespace as ``name``."""
        from ..langchain import VLLM  # here, not at %load_ext: LangChain's import takes five times as long

        self.shell.user_ns[name] = VLLM.from_session(self.session)

    def _show_controls(self, reuse: bool = False) -> None:
        # Re-running a load cell of the running engine shows the same panel again (one more view
        # of the same widgets): building a new one took most of a re-run's time, and every panel
        # stays subscribed to the session's results.
        panel = getattr(self, "_panel", None)
        if panel is None or not reuse or getattr(panel, "comm", None) is None:
            from ..widgets import SamplingPanel  # here, not at %load_ext: ipywidgets would make it 40% slower

            panel = self._panel = SamplingPanel(self.session)
        display_widget(panel)

    @magic_arguments()
    @argument("model", nargs="?", help="Model to serve; none: the one loaded here, else the demo model.")
    @argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine "
              "only; another one needs --api-key).")
    @argument("--port", type=int, help="Port (default 8000 when free, else a free one; 0: any free port).")
    @argument("--api-key", metavar="KEY", help="Require this key from clients (as their API key).")
    @argument("--handoff", action="store_true", help="Move the engine loaded here to the server and use it "
              "from this session (one copy of the model, for one GPU).")
    @argument("--timeout", type=float, help="Seconds to wait for the server to answer (default 900).")
    @argument("--persist", action="store_true", help="A server that outlives the kernel: a restarted kernel's "
              "%%vllm_serve --persist finds it running; it ends after --idle-timeout with no kernel attached and "
              "no request, or with %%vllm_serve --stop.")
    @argument("--idle-timeout", metavar="DURATION", help="How long a --persist server waits idle before it ends: "
              "90s, 15m (default), 2h, or never.")
    @argument("--status", action="store_true", help="Show the running server.")
    @argument("--logs", action="store_true", help="Show the end of the server's log.")
    @argument("--lines", type=int, default=40, help="How many log lines --logs shows (default 40).")
    @argument("--stop", action="store_true", help="Stop the server and every process it started.")
    @argument("flags", nargs="*", metavar="FLAGS",
              help="Any `vllm serve` flag, same spelling: engine flags as for %%vllm_load, and server ones "
                   "(--served-model-name, --enable-auto-tool-choice, --tool-call-parser, --reasoning-parser, ...).")
    @line_magic
    def vllm_serve(self, line: str = "") -> None:
        """Serve a model with vLLM's OpenAI-compatible server, owned by this kernel.

        Shows one progress line until the server answers, then its URL and client code. The server
        stops with ``%vllm_serve --stop`` and with the kernel (also when the kernel is killed); with
        ``--persist`` it outlives the kernel instead, as ``%vllm_load --persist`` engines do.
        Outside programs (the ``openai`` client, LangChain's ``VLLMOpenAI``, curl) use it as any
        ``vllm serve``; ``%vllm_load --remote URL`` points this session at it.

        Examples::

            %vllm_serve
            %vllm_serve --handoff
            %vllm_serve Qwen/Qwen2.5-7B-Instruct --port 8001 --enable-auto-tool-choice --tool-call-parser hermes
            %vllm_serve --host 0.0.0.0 --api-key $KEY
            %vllm_serve --persist --port 8000
            %vllm_serve --stop
        """
        args, split = split_vllm_line(self.vllm_serve, line)
        actions = [name for name in ("status", "logs", "stop") if getattr(args, name)]
        if len(actions) > 1 or (actions and (split.model or split.vllm or args.handoff)):
            raise UsageError(f"--{actions[0]} takes no model or flags" if len(actions) == 1
                             else "use one of --status, --logs and --stop at a time")
        server = self.session.server
        if args.status:
            print(server.describe() if server is not None else "no server is running (%vllm_serve starts one)")
            return
        if args.logs:
            log = server.log if server is not None else getattr(self, "_server_log", None)
            if log is None:
                print("no server was started in this kernel")
            else:
                text = log.read(max(args.lines, 1))
                print(text if text.strip() else f"(the server log {log.path} is empty)")
            return
        if args.stop:
            attached = server is not None and self.session.url == server.url
            stopped = self.session.stop_server()
            if stopped is None:
                print("no server is running")
                return
            self._server_log = stopped.log
            print(f"stopped the server at {stopped.base_url}; no process of it is left"
                  + ("; the session has no engine now (%vllm_load starts one)" if attached else ""))
            return
        if args.idle_timeout is not None and not args.persist:
            raise UsageError("--idle-timeout says when a --persist server ends: add --persist")
        with usage_errors():
            flags = serve_flags(split.vllm, split.model)
            idle = "default" if args.idle_timeout is None else parse_duration(args.idle_timeout)
        progress = LoadProgress(supports_updates(self.shell))
        unloaded = "; the engine was unloaded for the handoff (%vllm_load starts it again)" if args.handoff else ""
        with usage_errors(f"starting the server interrupted; it was stopped{unloaded}"), closing(progress):
            server = self.session.serve(flags.model, host=args.host, port=args.port, api_key=args.api_key,
                                        handoff=args.handoff, server_kwargs=flags.server, timeout=args.timeout,
                                        progress=progress, persist=args.persist, idle_timeout=idle, **flags.engine)
        self._server_log = server.log
        if args.persist and server.found:
            print(f"✓ {server.model_name} already served at {server.base_url} by a persisted engine "
                  f"(pid {server.pid}; %vllm_serve --stop ends it)")
        elif args.persist:
            ends = ("it runs until %vllm_serve --stop" if server.idle_timeout is None else
                    f"it ends after {format_duration(server.idle_timeout)} with no kernel attached and no request, "
                    "or with %vllm_serve --stop")
            print(f"✓ {server.model_name} served at {server.base_url} (ready in {server.ready_seconds:.1f} s) "
                  f"by a persisted engine: it outlives this kernel ({ends})")
        else:
            print(f"✓ {server.model_name} served at {server.base_url} (ready in {server.ready_seconds:.1f} s; "
                  "%vllm_serve --stop stops it)")
        if args.handoff:
            print("this session now uses it: cells, widgets and llm work as before")
            self._publish_langchain(self.langchain_name)
        display_code(server.client_snippet())

    @magic_arguments()
    @argument("--stop", action="store_true", help="Also end the persisted engine this kernel is attached to "
              "(whoever else is attached); with none attached, end those no kernel is attached to.")
    @argument("--embed", action="store_true", help="Unload only the embedding engine (%%vllm_load --embed).")
    @line_magic
    def vllm_unload(self, line: str = "") -> None:
        """Shut the engine down and free its memory (sleeping engines kept by --keep too, and the
        embedding engine of ``%vllm_load --embed``; ``--embed`` unloads only that one).

        A persisted engine (``%vllm_load --persist``) is detached from and keeps running for other
        kernels until its idle timeout; ``--stop`` ends it now.
        """
        args = parse_line(self.vllm_unload, line)
        embedder = self.session.embedder
        if args.embed:
            if args.stop:
                raise UsageError("--stop ends a persisted generation engine; it does not go with --embed")
            if not self.session.unload_embedder():
                print("no embedding model is loaded")
            else:
                print(f"unloaded the embedding engine of {embedder.config.short_name}"
                      + (" (the server keeps running)" if embedder.kind == "remote" else ""))
            return
        name = self.session.config.short_name if self.session.loaded else None
        url = self.session.url
        persisted = self.session.backend.persisted if self.session.loaded else None
        sleeping = [k.model for k in self.session.kept]
        if args.stop and persisted is None and not sleeping:
            self.session.unload()
            print(self._stop_unattached(name))
            return
        if self.session.unload(stop=args.stop):
            if persisted is not None and args.stop:
                first = f"ended the persisted engine of {name}; no process of it is left"
            elif persisted is not None:
                ends = ("it runs until %vllm_unload --stop" if persisted.idle_timeout is None else
                        f"it ends after {format_duration(persisted.idle_timeout)} with no kernel attached")
                first = f"detached from the persisted engine of {name} ({ends}; %vllm_load attaches again)"
            elif url:
                first = f"detached from the server at {url} (it keeps running)"
            else:
                first = f"unloaded {name}"
            done = [first] if name else []
            if embedder is not None:
                done.append(f"unloaded the embedding engine of {embedder.config.short_name}")
            if sleeping:
                from ..engine.config import short_model_name

                done.append(f"unloaded {len(sleeping)} sleeping engine(s): "
                            + ", ".join(short_model_name(m) for m in sleeping))
            print("; ".join(done))
        else:
            print("no model is loaded")

    def _stop_unattached(self, unloaded: str | None) -> str:
        """``%vllm_unload --stop`` with no persisted engine attached: end those no kernel is attached to."""
        stopped, kept = self.session.stop_unattached()
        parts = [f"unloaded {unloaded}"] if unloaded else []
        if stopped:
            parts.append("ended the persisted engine(s) of " + ", ".join(stopped) + " that no kernel was attached to")
        if kept:
            parts.append("kept " + ", ".join(kept) + " (kernels are attached: %vllm_unload --stop in one of them ends it)")
        if not parts:
            parts.append("no model is loaded and no persisted engine runs")
        return "; ".join(parts)

    @magic_arguments()
    @argument("level", nargs="?", type=int, default=1, choices=(1, 2),
              help="1 (default): weights to host RAM, KV cache discarded, waking takes about a second; "
                   "2: weights discarded too, waking reloads them.")
    @line_magic
    def vllm_sleep(self, line: str = "") -> None:
        """Put the loaded engine to sleep and free its GPU memory (vLLM's sleep mode; NVIDIA GPU).

        Requests still running are stopped. ``%vllm_wake``, the next request or a ``%vllm_load``
        of the same model wakes it. ``%vllm_status`` shows what it holds while it sleeps.
        """
        args = parse_line(self.vllm_sleep, line)
        with usage_errors():
            report = self.session.sleep(args.level)
        freed = report.freed_bytes
        freed_text = "" if freed is None else f", {freed / 2**30:.1f} GiB of GPU memory freed"
        print(f"✓ {self.session.config.short_name} asleep (level {report.level}: {report.holds}{freed_text}) "
              f"in {report.seconds:.1f} s; %vllm_wake or the next request wakes it")

    @line_magic
    def vllm_wake(self, line: str = "") -> None:
        """Wake the sleeping engine (reloading its weights after a level-2 sleep)."""
        if line.strip():
            raise UsageError("%vllm_wake takes no arguments")
        asleep = self.session.asleep
        with usage_errors():
            seconds = self.session.wake()
        name = self.session.config.short_name
        print(f"✓ {name} awake in {seconds:.1f} s" if asleep is not None else f"{name} is awake")

    @magic_arguments()
    @argument("model", help="Hugging Face model id (org/name).")
    @argument("--revision", metavar="REV", help="Branch, tag or commit (default: main).")
    @argument("--download-dir", metavar="DIR", help="The Hugging Face cache to use (default: HF_HOME's).")
    @line_magic
    def vllm_download(self, line: str = "") -> None:
        """Download a Hub model into the Hugging Face cache without starting an engine.

        Shows bytes and files done, rate and time left while it downloads; Ctrl-C stops it and a
        later download (or ``%vllm_load``) resumes where it stopped. A model already complete in
        the cache is not fetched again, and no network is used. ``HF_TOKEN`` opens gated and
        private models; ``HF_ENDPOINT`` names a mirror.

        Examples::

            %vllm_download HuggingFaceTB/SmolLM2-360M-Instruct
            %vllm_download Qwen/Qwen2.5-0.5B-Instruct --revision main
        """
        args = parse_line(self.vllm_download, line)
        progress = LoadProgress(supports_updates(self.shell))
        with usage_errors(), closing(progress):
            start = time.perf_counter()
            cached = self.session.hub_snapshot(args.model, revision=args.revision, download_dir=args.download_dir)
            path = cached or self.session.download(args.model, revision=args.revision,
                                                   download_dir=args.download_dir, progress=progress)
        if path is None:
            raise UsageError(f"{args.model} is not a Hugging Face model id (org/name); a local directory needs no "
                             "download")
        size = format_bytes(directory_size(path))
        if cached:
            print(f"{args.model} is in the cache ({size}): {path}")
        else:
            print(f"✓ {args.model} downloaded ({size}) in {time.perf_counter() - start:.1f} s: {path}")

    @magic_arguments()
    @argument("--download-dir", metavar="DIR", help="The Hugging Face cache to list (default: HF_HOME's).")
    @line_magic
    def vllm_models(self, line: str = "") -> Any:
        """The models this machine can load without a network: the Hugging Face cache's (size,
        architecture, whether the installed vLLM runs it, unfinished downloads) and the demo models."""
        args = parse_line(self.vllm_models, line)
        from ..engine.model_list import list_models

        return list_models(args.download_dir)

    @line_magic
    def vllm_status(self, line: str = "") -> Any:
        """What is loaded: model, platform, memory, requests and tokens served."""
        return self.session.status()

    @magic_arguments()
    @argument("name", nargs="?", help="The name requests use for the adapter (%%%%vllm --lora NAME).")
    @argument("path", nargs="?", help="The adapter's directory (peft's save_pretrained; for a --remote server, "
              "a path on its machine).")
    @argument("--remove", action="store_true", help="Forget the adapter NAME.")
    @argument("--any-base", action="store_true", help="Register it although its base model has another name "
              "(the same model saved elsewhere).")
    @line_magic
    def vllm_lora(self, line: str = "") -> None:
        """Register a LoRA adapter with the loaded engine, or list them.

        The engine needs vLLM's ``--enable-lora`` (and ``--max-lora-rank R`` for adapters of rank
        over 16). Cells then answer with it by name, and a grid puts it beside the model::

            %vllm_load --enable-lora
            %vllm_lora pirate /path/to/adapter
            %%vllm --lora pirate
            %%vllm --grid lora=base,pirate
        """
        args = parse_line(self.vllm_lora, line)
        with usage_errors():
            if args.remove:
                if not args.name or args.path:
                    raise UsageError("--remove takes the adapter's name only: %vllm_lora --remove NAME")
                adapter = self.session.remove_lora(args.name)
                print(f"adapter {adapter.name} removed")
                return
            if args.name and not args.path:
                raise UsageError(f"%vllm_lora {args.name} needs the adapter's directory: %vllm_lora NAME PATH")
            if args.name:
                adapter = self.session.add_lora(args.name, args.path, any_base=args.any_base)
                print(f"✓ adapter {adapter.summary}: %%vllm --lora {adapter.name}")
                return
            if self.session.config is None:
                raise UsageError("no model is loaded: %vllm_load MODEL --enable-lora first")
            adapters = self.session.adapters
            if not adapters:
                refusal = self.session.backend.lora_refusal()
                print(f"no adapters registered; {refusal}" if refusal else "no adapters registered: %vllm_lora NAME PATH")
            for adapter in adapters:
                print(adapter.summary)

    @magic_arguments()
    @argument("-n", "--lines", type=int, default=40, help="How many of the last lines to show (default 40).")
    @argument("--path", action="store_true", help="Only print where the log file is.")
    @line_magic
    def vllm_log(self, line: str = "") -> None:
        """Show the end of the engine's log (vLLM's own output, kept out of the cells)."""
        args = parse_line(self.vllm_log, line)
        log = self.session.log
        if args.path:
            print(log.path)
            return
        if args.lines < 1:
            raise UsageError("-n needs a positive number of lines")
        text = log.read(args.lines)
        print(text if text.strip() else f"(the engine log {log.path} is empty)")

    @magic_arguments()
    @argument("--defaults", action="store_true", help="Also put the sampling defaults back to theirs.")
    @line_magic
    def vllm_reset(self, line: str = "") -> None:
        """Forget the ``%%vllm --continue`` conversation."""
        args = parse_line(self.vllm_reset, line)
        turns = sum(1 for m in self.conversation if m["role"] == "user")
        self.conversation = []
        if args.defaults:
            self.session.defaults.reset()
        print(f"conversation cleared ({turns} turn{'s' if turns != 1 else ''})"
              + (", sampling defaults reset" if args.defaults else ""))

    @line_magic
    def vllm_controls(self, line: str = "") -> None:
        """Show the sampling panel (sliders bound to the session's defaults, and a Stop button)."""
        from ..widgets import SamplingPanel

        display_widget(SamplingPanel(self.session))

    @line_magic
    def vllm_playground(self, line: str = "") -> None:
        """Show the playground: a prompt box, the sampling panel and a Generate button."""
        from ..widgets import Playground

        display_widget(Playground(self.session))

    # ----- prompts ------------------------------------------------------------------------------
    @magic_arguments()
    @argument("--raw", action="store_true", default=None,
              help="Send the cell as a plain completion prompt (no chat template).")
    @argument("--system", metavar="TEXT", help="System message (chat mode).")
    @argument("-c", "--continue", dest="cont", action="store_true",
              help="Continue the conversation of earlier --continue cells (%%vllm_reset clears it).")
    @sampling_args
    @argument("--json", metavar="SCHEMA",
              help="Answer as JSON of this schema: a dict or pydantic model name, or inline JSON.")
    @argument("--regex", metavar="PATTERN", help="Answer matching this regular expression.")
    @argument("--choice", metavar="A,B,C", help="Answer exactly one of these comma-separated choices.")
    @argument("--think", dest="think", action="store_true", default=None,
              help="Let a reasoning model think first (enable_thinking=True for its chat template).")
    @argument("--no-think", dest="think", action="store_false",
              help="Ask a reasoning model to answer without thinking (enable_thinking=False).")
    @argument("--thinking-budget", type=int, metavar="N", help="Most tokens the model may think for "
              "(vLLM's thinking token budget).")
    @argument("--format", choices=FORMATS, help="Render as markdown (default), text, code or json.")
    @argument("--quiet", action="store_true", help="Hide the stats line.")
    @argument("--show-prompt", action="store_true", help="Show the prompt as sent, after the chat template.")
    @argument("--out", metavar="NAME", help="Also store the result (a list for a batch) in NAME.")
    @argument("--explore", action="store_true", help="Show the answer in a token explorer: tokens coloured by "
              "probability, their alternatives, and branches from any of them (asks for --logprobs 5 unless given).")
    @argument("--lora", metavar="NAME", help="Answer with the LoRA adapter registered as NAME (%%vllm_lora NAME "
              "PATH); 'base': the model without one.")
    @argument("--grid", action="append", metavar="OPTION=V1,V2",
              help="Answer under each value of a sampling option (e.g. --grid temperature=0,0.7,1.2, or "
              "lora=base,NAME for adapters beside the model); several "
              "--grid flags make every combination. The cell's prompts x settings go in one submission and show "
              "as a table; the value is a Grid (grid.to_pandas()).")
    @no_var_expand
    @cell_magic
    def vllm(self, line: str, cell: str) -> Any:
        """Send the cell to the model and stream the answer into the output.

        ``{name}`` is filled from the namespace (``{{`` for a literal brace); a line holding only
        ``---`` separates prompts sent together as one batch. The cell's value is a
        :class:`~vllm_magic.magics.results.VllmResult` (a list of them for a batch). Interrupting the
        kernel stops the generation; what was streamed stays, marked interrupted.

        Examples::

            %%vllm -t 0 -m 64
            What is the capital of France?

            %%vllm --choice positive,negative --out verdict
            Is this review positive or negative? {review}
        """
        args = parse_line(self.vllm, line)
        namespace = dict(self.shell.user_ns)
        try:
            prompts = [interpolate(p, namespace) for p in split_batch(cell)]
            structured, parse = self._structured(args, namespace)
        except PromptError as exc:
            raise UsageError(str(exc)) from None
        if args.cont and len(prompts) > 1:
            raise UsageError("--continue takes one prompt, not a '---' batch")
        if args.cont and args.raw:
            raise UsageError("--continue needs the chat template; drop --raw")
        if args.grid:
            return self._grid(args, prompts, structured)
        if args.explore and args.logprobs is None:
            args.logprobs = EXPLORER_ALTERNATIVES
        items: list[Any] = prompts
        if args.cont:
            items = [self._conversation_with(prompts[0], args.system)]
        thinking = self._thinking(args)
        with usage_errors():
            if self.session.asleep is not None:  # the request would wake it: say so, it may take seconds
                print(f"waking {self.session.config.short_name} (asleep, level {self.session.asleep.level})")
            handles = self.session.submit(items, raw=args.raw, system=args.system, **structured, **thinking,
                                          stream=len(items) <= STREAMED_PROMPTS, lora=args.lora,
                                          **sampling_overrides(args))
        try:
            return self._answer(handles, prompts, items, parse, args)
        except KeyboardInterrupt:  # outside the streaming loop (which handles it): never leave requests running
            for handle in handles:
                handle.abort()
            raise

    def _grid(self, args: Any, prompts: list[str], structured: dict[str, Any]) -> Any:
        """``--grid``: the cell's prompts under every combination of the grid's values, one submission,
        shown as a table (the cell's value is the :class:`~vllm_magic.engine.requests.grid.Grid`)."""
        clash = [flag for flag, given in (("--continue", args.cont), ("--explore", args.explore),
                                          ("--json/--regex/--choice", bool(structured))) if given]
        if clash:
            raise UsageError(f"--grid compares plain answers side by side; drop {', '.join(clash)}")
        with usage_errors():
            axes: dict[str, list[Any]] = {}
            for spec in args.grid:
                name, values = parse_grid_flag(spec)
                if name in axes:
                    raise UsageError(f"--grid {name} is given twice; put all its values in one flag")
                axes[name] = values
            fixed = {"lora": args.lora} if args.lora is not None else {}
            grid = self.session.grid(prompts, axes, raw=args.raw, system=args.system, **fixed,
                                     **sampling_overrides(args))
        with usage_errors(interrupted="interrupted: the grid's requests were aborted in the engine"):
            progress = GridProgress(grid, live=supports_updates(self.shell))
            progress.wait()
        if args.out:
            self.shell.user_ns[args.out] = grid
        return grid

    def _structured(self, args: Any, namespace: dict) -> tuple[dict, Callable[[str], Any] | None]:
        given = [flag for flag in ("json", "regex", "choice") if getattr(args, flag)]
        if len(given) > 1:
            raise PromptError(f"use one of --json, --regex and --choice, not {' and '.join('--' + g for g in given)}")
        if args.json:
            schema, parse = resolve_json_schema(args.json, namespace)
            return {"json_schema": schema}, parse
        if args.regex:
            return {"regex": args.regex}, str
        if args.choice:
            return {"choice": parse_choices(args.choice)}, str
        return {}, None

    @staticmethod
    def _thinking(args: Any) -> dict[str, Any]:
        """``submit`` arguments of ``--think``/``--no-think`` and ``--thinking-budget`` (the session
        checks them, as it does for every front-end)."""
        options: dict[str, Any] = {}
        if args.think is not None:
            options["chat_template_kwargs"] = {"enable_thinking": args.think}
        if args.thinking_budget is not None:
            options["thinking_token_budget"] = args.thinking_budget
        return options

    def _conversation_with(self, prompt: str, system: str | None) -> list[dict[str, str]]:
        messages = [dict(m) for m in self.conversation]
        if system is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": system})
        return messages + [{"role": "user", "content": prompt}]

    def _answer(self, handles: list, prompts: list[str], items: list, parse: Callable[[str], Any] | None,
                args: Any) -> Any:
        """Stream the cell's answers, then keep the conversation, store ``--out`` and return the value."""
        results, interrupted = stream_results(
            handles, prompts, items, parse, fmt=args.format or ("json" if args.json else self.output_format),
            live=supports_updates(self.shell), interval=self.stream_interval, show_prompt=args.show_prompt,
            quiet=args.quiet)
        if args.explore and not interrupted:
            for result in results:
                display_widget(result.explore())
        if args.cont and not interrupted:
            self.conversation = results[0].messages + [{"role": "assistant", "content": results[0].text}]
        value: Any = results if len(results) > 1 else results[0]
        if args.out:
            self.shell.user_ns[args.out] = value
        if interrupted:
            # End the cell as an error, as an interrupt should: "Run All" stops here instead of going on
            # to the next cell. The partial answer stays visible above.
            kept = f"; the partial result is in {args.out}" if args.out else ""
            raise UsageError(f"interrupted: the request was aborted in the engine{kept}")
        return value


# magic_arguments writes every usage as "%name"; the cell magic's help should read "%%vllm".
VllmMagics.vllm.__doc__ = VllmMagics.vllm.__doc__.replace("  %vllm [", "  %%vllm [", 1)


def register(ipython: Any, session: EngineSession | None = None) -> VllmMagics:
    """Register the magics on ``ipython`` (``%load_ext vllm_magic``); returns the magics object."""
    unregister(ipython, shutdown=False)  # %reload_ext: never two instances writing the same defaults
    magics = VllmMagics(shell=ipython, session=session)  # also joins ipython.configurables (%config)
    ipython.register_magics(magics)
    return magics


def unregister(ipython: Any, shutdown: bool = True) -> None:
    """Remove the magics and (by default) shut the engine and the server of ``%vllm_serve`` down,
    freeing their memory."""
    for magics in [c for c in ipython.configurables if isinstance(c, VllmMagics)]:
        table = ipython.magics_manager.magics
        for kind in ("line", "cell"):
            for name in list(magics.magics.get(kind, {})):
                if getattr(table[kind].get(name), "__self__", None) is magics:
                    del table[kind][name]
        magics.close()
        if shutdown:
            magics.session.stop_server()
            magics.session.unload()


def _refuse_given(args: Any, mode: str, about: str, *flags: str) -> None:
    """One line for the first of ``flags`` given beside ``--mode``, where it has no meaning."""
    for flag in flags:
        value = getattr(args, flag)
        if value not in (None, False) and not (flag == "as_name" and value == "llm"):
            spelled = "--as" if flag == "as_name" else "--" + flag.replace("_", "-")
            raise UsageError(f"{spelled} is about {about}; it does not go with --{mode}")


def _adapter_engine_args(adapters: tuple[tuple[str, str], ...], args: Any) -> dict[str, Any]:
    """``--lora-modules``: the engine arguments that run those adapters (``enable_lora``, a
    ``max_lora_rank`` that takes them), read from their files before any engine starts."""
    if not adapters:
        return {}
    if args.persist:
        raise UsageError("--lora-modules registers adapters with an engine of this kernel; for a --persist "
                         "engine, register them with %vllm_lora NAME PATH once it runs")
    from ..engine.requests.adapters import engine_args_for, read_adapter

    return engine_args_for([read_adapter(name, path) for name, path in adapters])
