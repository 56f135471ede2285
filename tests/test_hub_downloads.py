"""Hub models as users get them, against a real HTTP stand-in for the Hub on 127.0.0.1.

vllm-magic's own download code runs against it (``HF_ENDPOINT``); each test has its own Hugging Face
cache (``HF_HOME`` in a temporary directory) and its own stand-in, serving a small repository: the
demo model's configuration and tokenizer, and 12 MB of weights (the downloads here start no engine;
tests/test_hub_kernels.py loads a downloaded model in real kernels).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from hub_standin import HubStandIn
from vllm_magic.hub import DownloadInterrupted, HubError, cached_snapshot, fetch, hub_cache_dir
from vllm_magic.hub import download as download_module
from vllm_magic.engine.model_list import list_models
from vllm_magic.hub.cache import complete_model
from vllm_magic.hub.download import _files_to_fetch

SMALL = "acme/small-chat"
GATED = "acme/gated-chat"
WEIGHTS = 12 * 1024 * 1024
_SIDE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory) -> Path:
    from vllm_magic import prepare_demo_model

    demo = prepare_demo_model(quiet=True)
    repo = tmp_path_factory.mktemp("small-repo")
    for name in _SIDE:
        shutil.copy(demo / name, repo / name)
    (repo / "model.safetensors").write_bytes(os.urandom(WEIGHTS))
    (repo / "README.md").write_text("# small chat\n")  # not a file vLLM loads: never downloaded
    return repo


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache of this test's own, and no token or offline switch from the machine."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def hub(small_repo, hf_home, monkeypatch):
    with HubStandIn({SMALL: small_repo, GATED: small_repo}, gated=[GATED]) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        yield standin


def _same_files(snapshot: Path, repo: Path) -> None:
    for name in (*_SIDE, "model.safetensors"):
        assert (snapshot / name).read_bytes() == (repo / name).read_bytes(), name
    assert not (snapshot / "README.md").exists()


def _total(repo: Path) -> str:
    """The size of what a download of ``repo`` fetches, as the messages write it."""
    from vllm_magic.hub import format_bytes

    return format_bytes(sum((repo / name).stat().st_size for name in (*_SIDE, "model.safetensors")))


def _file_requests(standin: HubStandIn) -> list:
    return [r for r in standin.requests if "/resolve/" in r.path]


# ----- downloads ---------------------------------------------------------------------------------

def test_download_reports_progress_and_a_second_fetch_uses_the_cache_without_network(hub, small_repo):
    stages = []
    hub.rate = 4 * WEIGHTS  # a quarter of a second: the progress line is seen at least once
    hub.hold_after(WEIGHTS // 2)

    def progress(stage, elapsed):
        stages.append(stage)
        if hub.held.is_set() and re.search(r": [1-9][\d.]* MB of ", stage):
            hub.release()  # a progress line showed bytes on their way: let the download finish

    snapshot = fetch(SMALL, progress=progress)
    _same_files(snapshot, small_repo)
    seen = [s for s in stages if s.startswith(f"downloading {SMALL}: ")]
    assert seen and re.search(rf"[\d.]+ MB of {_total(small_repo)} · \d of 6 files", seen[-1]), stages

    hub.stop()  # the Hub is gone: the cache answers, and nothing is asked of the network
    asked = len(hub.requests)
    assert fetch(SMALL) == snapshot == cached_snapshot(SMALL)
    assert len(hub.requests) == asked


def test_interrupted_download_keeps_its_bytes_and_the_next_one_resumes_with_a_range_request(hub, small_repo,
                                                                                            kernel_sigint):
    import signal

    folder = hub_cache_dir() / "models--acme--small-chat"
    hub.hold_after(WEIGHTS // 3)  # more than the other files together: the weights are part way

    def partial():
        return [f for f in (folder / "blobs").glob("*.incomplete") if f.stat().st_size]

    def progress(stage, elapsed):
        if hub.held.is_set() and partial():
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C (interrupt_kernel) while the download shows progress

    # Sizes are shown in kB below 1 MB: how far the download got when Ctrl-C came depends on the machine's load.
    with pytest.raises(DownloadInterrupted, match=rf"interrupted at [\d.]+ [kM]?B of {_total(small_repo)}; .*resumes") as info:
        fetch(SMALL, progress=progress)
    assert isinstance(info.value, KeyboardInterrupt)
    assert partial() and cached_snapshot(SMALL) is None  # nothing half-written in the snapshot
    row = next(r for r in list_models().rows if r.name == SMALL)
    assert re.fullmatch(r"not yet: [\d.]+ [kM]?B of an unfinished download \(loading it resumes\)", row.runs), row
    hub.release()

    snapshot = fetch(SMALL)
    _same_files(snapshot, small_repo)
    assert any(r.range and not r.range.startswith("bytes=0-") for r in _file_requests(hub))


def test_server_gone_mid_download_is_one_line_and_a_later_download_resumes(hub, small_repo, monkeypatch):
    hub.drop_after(WEIGHTS // 2)
    with pytest.raises(HubError, match=r"connection to 127\.0\.0\.1:\d+ was lost while downloading "
                                       rf"acme/small-chat: [\d.]+ MB of {_total(small_repo)} stay in the cache") as info:
        fetch(SMALL)
    assert "\n" not in str(info.value)
    assert cached_snapshot(SMALL) is None
    hub.start()  # back on the same address
    _same_files(fetch(SMALL), small_repo)
    assert any(r.range and not r.range.startswith("bytes=0-") for r in _file_requests(hub))


# ----- refusals, each one line before a byte is downloaded -----------------------------------------

def test_gated_model_without_a_token_names_hf_token_and_with_it_downloads(hub, small_repo, monkeypatch):
    with pytest.raises(HubError, match=r"acme/gated-chat is gated or private: .*set HF_TOKEN"):
        fetch(GATED)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match=r"the token in use \(HF_TOKEN\) has no access"):
        fetch(GATED)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    _same_files(fetch(GATED), small_repo)


def test_missing_model_and_missing_revision_are_one_line(hub):
    with pytest.raises(HubError, match=r"^no model acme/nothing-here on 127\.0\.0\.1:\d+: check the name"):
        fetch("acme/nothing-here")
    with pytest.raises(HubError, match=r"^acme/small-chat has no revision 'v9'"):
        fetch(SMALL, revision="v9")
    assert not _file_requests(hub)


def test_unreachable_hub_without_the_model_says_what_to_do(hf_home, monkeypatch):
    with HubStandIn({}) as gone:
        url = gone.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # nothing listens there any more
    with pytest.raises(HubError) as info:
        fetch(SMALL)
    message = str(info.value)
    assert message.startswith(f"{SMALL} is not in the Hugging Face cache ({hf_home / 'hub'}) and ")
    assert "cannot be reached (connection refused)" in message
    assert "python -m vllm_magic download acme/small-chat" in message and "HF_ENDPOINT" in message


def test_offline_switch_is_honoured_without_any_request(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        fetch(SMALL)
    assert hub.requests == []


def test_too_little_disk_space_is_refused_before_the_download(hub, small_repo, monkeypatch):
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        free = download_module.DISK_MARGIN + WEIGHTS  # room for the weights, not for the tokenizer beside them
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(download_module.shutil, "disk_usage", nearly_full)
    with pytest.raises(HubError, match=rf"acme/small-chat needs {_total(small_repo)} more in .* and [\d.]+ MB are free"):
        fetch(SMALL)
    assert not _file_requests(hub)


# ----- what is fetched, and when a snapshot is complete (pure logic) -------------------------------

@pytest.mark.parametrize("names, expected", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "README.md", "onnx/model.onnx"],
     {"config.json", "model.safetensors"}),
    (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "training_args.bin",
      "pytorch_model.bin.index.json", "tokenizer.model"],
     {"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
      "pytorch_model.bin.index.json", "tokenizer.model"}),
    (["params.json", "consolidated.safetensors", "model-00001-of-00001.safetensors", "tekken.json",
      "original/consolidated.00.pth"],
     {"params.json", "model-00001-of-00001.safetensors", "tekken.json"}),
    (["config.json", "modeling_x.py", "model.safetensors", "merges.txt", "vocab.json"],
     {"config.json", "modeling_x.py", "model.safetensors", "merges.txt", "vocab.json"}),
])
def test_the_files_vllm_loads_are_fetched_one_weight_format_only(names, expected):
    assert _files_to_fetch("org/name", names) == expected


def test_repositories_without_loadable_weights_are_refused_in_one_line():
    with pytest.raises(HubError, match="holds GGUF files, one per quantization"):
        _files_to_fetch("org/name-GGUF", ["README.md", "model.Q4_K_M.gguf", "model.Q8_0.gguf"])
    with pytest.raises(HubError, match="has no weights vLLM loads"):
        _files_to_fetch("org/name", ["README.md", "config.json"])


def test_a_snapshot_is_complete_only_with_every_shard_of_one_index(tmp_path):
    import json

    (tmp_path / "config.json").write_text("{}")
    assert not complete_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    (tmp_path / "model-1.safetensors").write_bytes(b"1")
    assert not complete_model(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"2")
    assert complete_model(tmp_path)


# ----- through the magics and LangChain, the session's engine untouched ------------------------------

def test_load_of_a_gated_or_unreachable_model_is_one_line_and_keeps_the_engine(ip, engine, hub, monkeypatch):
    from vllm_magic.langchain import VLLM

    created, config = engine.engines_created, engine.config
    for line, message in ((GATED, "acme/gated-chat is gated or private: .*HF_TOKEN"),
                          ("acme/nothing-here --max-model-len 2048", "no model acme/nothing-here on")):
        with pytest.raises(UsageError, match=message) as info:
            ip.run_line_magic("vllm_load", line)
        assert type(info.value) is UsageError and len(str(info.value).splitlines()) == 1
    with pytest.raises(HubError, match="acme/gated-chat is gated or private"):
        VLLM(model=GATED)
    monkeypatch.setenv("HF_ENDPOINT", "http://no-such-host.invalid")
    with pytest.raises(HubError, match=r"no-such-host\.invalid cannot be reached \(its name does not resolve"):
        VLLM(model="acme/elsewhere")
    assert engine.loaded and engine.engines_created == created and engine.config is config


def test_download_magic_and_models_list(ip, engine, hub, small_repo, capsys):
    ip.run_line_magic("vllm_download", SMALL)
    out = capsys.readouterr().out
    assert re.match(rf"✓ {SMALL} downloaded \({_total(small_repo)}\) in [\d.]+ s: .*snapshots/[0-9a-f]{{40}}\n$", out), out
    ip.run_line_magic("vllm_download", SMALL)
    assert capsys.readouterr().out.startswith(f"{SMALL} is in the cache ({_total(small_repo)}): ")
    with pytest.raises(UsageError, match="not a Hugging Face model id"):
        ip.run_line_magic("vllm_download", "just-a-name")

    listing = ip.run_line_magic("vllm_models", "")
    rows = {row.name: row for row in listing.rows}
    assert rows[SMALL].runs == "yes" and rows[SMALL].architecture == "LlamaForCausalLM"
    assert rows[SMALL].size >= WEIGHTS and "SmolLM2-135M-Instruct" in rows
    assert f"| `{SMALL}` | {_total(small_repo)} | LlamaForCausalLM | yes |" in listing._repr_markdown_()


def test_readme_hub_examples_run(ip, engine, small_repo, hf_home, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("<!-- section: hub -->"):readme.index("<!-- section: langchain -->")]
    blocks = re.findall(r"```ipython\n(.*?)```", section, flags=re.S)
    named = re.search(r"%vllm_download (\S+)", section).group(1)
    assert len(blocks) == 2
    with HubStandIn({named: small_repo}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        results = [ip.run_cell(block) for block in blocks]
    assert all(r.success for r in results), [r.error_in_exec for r in results]
    assert capsys.readouterr().out.startswith(f"✓ {named} downloaded ({_total(small_repo)}) in ")
    assert named in {row.name for row in results[1].result.rows}


def test_revision_and_download_dir_are_honoured_and_the_engine_gets_the_snapshot(ip, engine, hub, small_repo,
                                                                                 tmp_path, capsys):
    from vllm_magic.engine.backends.server import server_command
    from vllm_magic.engine.config import resolve_engine_config

    commit, elsewhere = hub.commit(SMALL), tmp_path / "models"
    ip.run_line_magic("vllm_download", f"{SMALL} --revision {commit} --download-dir {elsewhere}")
    assert capsys.readouterr().out.startswith(f"✓ {SMALL} downloaded")
    snapshot = cached_snapshot(SMALL, commit, elsewhere)
    assert snapshot == elsewhere / "models--acme--small-chat" / "snapshots" / commit
    assert cached_snapshot(SMALL) is None  # the default cache was left alone

    config = resolve_engine_config(SMALL, revision=commit, download_dir=str(elsewhere), max_model_len=2048)
    assert config.model == SMALL and config.weights == str(snapshot)
    kwargs = config.llm_kwargs()  # what vllm.LLM gets: the directory, under the Hub name, nothing to fetch
    assert (kwargs["model"], kwargs["tokenizer"], kwargs["served_model_name"]) == (str(snapshot), str(snapshot), SMALL)
    assert "revision" not in kwargs and "download_dir" not in kwargs
    argv, _env = server_command(config, {}, ["--port", "8123"], None)
    assert argv[:2] == ["--model", str(snapshot)] and "--served-model-name" in argv


def test_command_line_download_prints_the_directory_and_refuses_in_one_line(hub, small_repo):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "vllm_magic", "download", SMALL], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    snapshot = Path(run.stdout.strip())
    assert snapshot == cached_snapshot(SMALL) and run.stderr.strip().endswith(f"{SMALL}: {_total(small_repo)}")
    _same_files(snapshot, small_repo)
    missing = subprocess.run([sys.executable, "-m", "vllm_magic", "download", "acme/nothing-here"],
                             capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert missing.returncode == 1 and missing.stderr.startswith("error: no model acme/nothing-here on ")
    assert len(missing.stderr.strip().splitlines()) == 1 and missing.stdout == ""
