"""Command line: ``python -m vllm_magic demo-model`` prepares the demo model (``--awq``: its AWQ
checkpoint), ``tiny-model`` the demo model reshaped for tensor parallel, ``demo-lora`` a LoRA adapter
for it that makes it talk like a pirate;
``python -m vllm_magic demo`` runs the quickstart notebook headless and prints what each cell showed;
``download ORG/NAME`` fetches a Hub model into the Hugging Face cache (on a machine with network,
for notebooks that run where there is none); ``models`` lists what the cache holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

def _notebooks_dir() -> Path:
    """The tutorial notebooks: beside the package in a checkout, under share/ when installed."""
    checkout = Path(__file__).resolve().parent.parent / "notebooks"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "vllm-magic" / "notebooks"


def _notebooks(args: argparse.Namespace) -> int:
    import shutil

    source = _notebooks_dir()
    target = Path(args.dest)
    target.mkdir(parents=True, exist_ok=True)
    copied = [shutil.copy2(nb, target / nb.name) for nb in sorted(source.glob("*.ipynb"))]
    if not copied:
        print(f"error: no tutorial notebooks found in {source}", file=sys.stderr)
        return 1
    for path in copied:
        print(path)
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from .demo.model import prepare_demo_model
    from .demo.variants import prepare_awq_demo_model

    return _prepare(prepare_awq_demo_model if args.awq else prepare_demo_model, args)


def _tiny_model(args: argparse.Namespace) -> int:
    from .demo.variants import prepare_tiny_model

    return _prepare(prepare_tiny_model, args)


def _demo_lora(args: argparse.Namespace) -> int:
    from .demo.lora import prepare_demo_lora

    return _print_path(lambda: prepare_demo_lora(quiet=args.quiet, force=args.force))


def _prepare(prepare, args: argparse.Namespace) -> int:
    return _print_path(lambda: prepare(verify=args.verify, quiet=args.quiet))


def _print_path(make) -> int:
    """Print the directory ``make()`` prepares; a demo file that cannot be made is one line, exit 1."""
    from .demo.model import DemoModelError

    try:
        path = make()
    except DemoModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _download(args: argparse.Namespace) -> int:
    from .hub import HubError, directory_size, fetch, format_bytes, is_repo_id

    if not is_repo_id(args.model):
        print(f"error: {args.model} is not a Hugging Face model id (org/name)", file=sys.stderr)
        return 2
    last = [0.0]

    def progress(stage: str, elapsed: float) -> None:
        if elapsed - last[0] >= 5 or not last[0]:  # a line every few seconds: logs stay readable
            last[0] = elapsed
            print(f"{stage} · {elapsed:.0f} s", file=sys.stderr, flush=True)

    try:
        path = fetch(args.model, args.revision, args.download_dir, progress=None if args.quiet else progress)
    except HubError as exc:  # DownloadInterrupted included
        print(f"error: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if not args.quiet:
        print(f"{args.model}: {format_bytes(directory_size(path))}", file=sys.stderr)
    print(path)
    return 0


def _models(args: argparse.Namespace) -> int:
    from .engine.model_list import list_models

    print(repr(list_models(args.download_dir)))
    return 0


def _cell_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    for key in ("text/markdown", "text/plain"):
        if key in data:
            value = data[key]
            return "".join(value) if isinstance(value, list) else value
    return ""


def _demo(args: argparse.Namespace) -> int:
    notebook = Path(args.notebook) if args.notebook else _notebooks_dir() / "01-quickstart.ipynb"
    if not notebook.is_file():
        return _demo_without_notebook()
    import tempfile

    import nbformat
    from jupyter_client import KernelManager
    from nbclient import NotebookClient

    print(f"Running {notebook.name} headless (the first run prepares the demo model and starts vLLM)...\n")
    nb = nbformat.read(notebook, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vllm-magic-demo-") as tmp:
        # Local IPC sockets instead of TCP ports: nothing listens on the network, and the kernel has
        # no reason to warn about plain-text TCP.
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(tmp) / "kernel"),
                           connection_file=str(Path(tmp) / "kernel.json"))
        client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(notebook.parent)}})
        client.execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print("In : " + cell.source.replace("\n", "\n     "))
        for output in cell.get("outputs", []):
            text = _cell_text(output).rstrip()
            if text:
                print("Out: " + text.replace("\n", "\n     "))
        print()
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0


def _demo_without_notebook() -> int:
    from .engine import get_session

    session = get_session()
    info = session.load()
    print(info.summary)
    prompt = "What is the capital of France?"
    print(f"> {prompt}")
    for delta in session.submit(prompt, temperature=0)[0]:
        print(delta, end="", flush=True)
    print()
    session.unload()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_magic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-model", help="prepare the embedded demo model and print its directory")
    p.add_argument("--awq", action="store_true",
                   help="the demo model as a 4-bit AWQ checkpoint instead (load it with --quantization awq)")
    p.add_argument("--verify", action="store_true", help="re-hash every file and rebuild on a mismatch")
    p.add_argument("--quiet", action="store_true", help="print only the directory")
    p.set_defaults(func=_demo_model)
    p = sub.add_parser("tiny-model", help="prepare the demo model reshaped for tensor parallel (12 attention "
                       "heads, 4 KV heads: TP 1, 2 or 4) and print its directory")
    p.add_argument("--verify", action="store_true", help="re-hash every file and rebuild on a mismatch")
    p.add_argument("--quiet", action="store_true", help="print only the directory")
    p.set_defaults(func=_tiny_model)
    p = sub.add_parser("demo-lora", help="prepare the demo LoRA adapter (trained here once, on the CPU: the demo "
                       "model answers like a pirate) and print its directory")
    p.add_argument("--force", action="store_true", help="train it again even when it is prepared")
    p.add_argument("--quiet", action="store_true", help="print only the directory")
    p.set_defaults(func=_demo_lora)
    p = sub.add_parser("demo", help="run the quickstart notebook headless and print its outputs")
    p.add_argument("--notebook", help="another notebook to run")
    p.set_defaults(func=_demo)
    p = sub.add_parser("download", help="download a Hugging Face Hub model into the cache and print its directory")
    p.add_argument("model", help="the model id, org/name")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--download-dir", help="the Hugging Face cache to use (default: HF_HOME's)")
    p.add_argument("--quiet", action="store_true", help="print only the directory")
    p.set_defaults(func=_download)
    p = sub.add_parser("models", help="list the models of the Hugging Face cache and the demo models")
    p.add_argument("--download-dir", help="the Hugging Face cache to list (default: HF_HOME's)")
    p.set_defaults(func=_models)
    p = sub.add_parser("notebooks", help="copy the tutorial notebooks into a directory")
    p.add_argument("dest", help="where to put them")
    p.set_defaults(func=_notebooks)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
