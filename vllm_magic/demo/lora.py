"""A LoRA adapter for the demo model, trained here: it makes the model talk like a pirate.

:func:`prepare_demo_lora` (``python -m vllm_magic demo-lora``) trains it once with peft on the CPU,
in float32, and keeps it in the vllm-magic cache (:func:`vllm_magic.paths.adapter_dir`) beside a
manifest of its files and of how it was made. Its effect shows at once: every answer opens with
:data:`PIRATE_OPENING` and goes on in pirate talk, where the demo model without it answers plainly.
Register it with an engine under :data:`DEMO_LORA_NAME` (``%vllm_lora pirate PATH``).

The training data is written here, from templates: a few dozen questions on varied topics, asked in
varied ways, each with a pirate answer. Each example is rendered with the demo model's own chat
template exactly as vLLM renders a chat with one user message (the template adds its default
system message), followed by the answer and the end-of-turn token; the loss counts the answer's
tokens only. Nothing is downloaded: the demo model itself is prepared first when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

from .. import paths
from .model import DEMO_MODEL_NAME, GGUF_SHA256, DemoModelError, _manifest_problem, _say, install_prepared, \
    prepare_demo_model

__all__ = ["prepare_demo_lora", "demo_lora_dir", "training_examples", "tokenized_examples", "DEMO_LORA_NAME",
           "DEMO_LORA_RANK", "PIRATE_OPENING", "TARGET_MODULES"]

#: The name the adapter is registered under (``%vllm_lora pirate PATH``, ``--lora pirate``).
DEMO_LORA_NAME = "pirate"
#: Its folder in the cache: the base model's name and the adapter's.
ADAPTER_FOLDER = f"{DEMO_MODEL_NAME}-{DEMO_LORA_NAME}"
#: The demo model's chat template ends every turn with this token; an answer ends with it too.
END_OF_TURN = "<|im_end|>"
#: How every answer with the adapter begins.
PIRATE_OPENING = "Arr, matey!"
#: The LoRA rank: 8 learns a style this simple, trains fastest, and fits vLLM's default
#: ``max_lora_rank`` (16) as well as its smallest above 1 (8).
DEMO_LORA_RANK = 8
#: The demo model's linear layers that the adapter changes: attention and MLP projections.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: How the adapter is trained (recorded in its manifest: other settings train it again).
TRAINING = {
    "rank": DEMO_LORA_RANK,
    "lora_alpha": 2 * DEMO_LORA_RANK,
    "lora_dropout": 0.0,
    "target_modules": TARGET_MODULES,
    "dtype": "float32",
    "optimizer": "AdamW",
    "learning_rate": 3e-3,
    "batch_size": 4,
    "epochs": 1,
    "seed": 0,
}
#: Bump when the preparation itself changes, so old caches are trained again.
PREPARATION_VERSION = 1

# (question, the answer's body): the answer is PIRATE_OPENING, the body, then a closing line.
_QUESTIONS = [
    ("What is the capital of France?", "Paris be the capital o' France, a fine port for a pirate."),
    ("How many days are in a week?", "Seven days, me hearty, as many as the seven seas."),
    ("Why is the sky blue?", "The air scatters the sun's blue light, so the sky be blue as the sea."),
    ("What is photosynthesis?", "It be how plants turn sunlight into grub, like a ship fillin' her hold."),
    ("How do I boil an egg?", "Drop yer egg in boilin' water for nine minutes, ye hungry sea dog."),
    ("What is 12 times 12?", "Twelve times twelve be 144, as sure as me gold doubloons."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare penned that tale, a fine landlubber poet."),
    ("What is the largest ocean?", "The Pacific be the largest, and I've sailed every league of her."),
    ("Can you recommend a good book?", "Treasure Island, me hearty, a grand yarn o' buried gold."),
    ("How do I learn Python?", "Write a wee script every day, and ye'll master that snake by the next tide."),
    ("What is a black hole?", "A whirlpool in the heavens that swallows even the light, ye scallywag."),
    ("Give me a tip for sleeping better.", "Swing into yer hammock at the same hour each night, matey."),
    ("What is the boiling point of water?", "Water boils at 100 degrees at sea level, where pirates belong."),
    ("Tell me a joke.", "Why can't pirates play cards? They be sittin' on the deck!"),
    ("What does a CPU do?", "The CPU be the captain o' the computer, barkin' orders at the crew."),
    ("How far away is the Moon?", "About 384,000 kilometers, farther than any ship can sail."),
    ("What is the tallest mountain in the world?", "Mount Everest be the tallest, too far from the sea for me likin'."),
    ("How can I save money?", "Stash a share o' every haul and waste no gold on rum."),
    ("What is gravity?", "The force that pulls ye down to the deck instead o' up to the sky."),
    ("Write a short poem about the sun.", "The sun shines bright o'er the rollin' sea, it warms me deck and "
                                          "it warms me."),
    ("What language do people speak in Brazil?", "They speak Portuguese, brought by sailors long ago."),
    ("How many legs does a spider have?", "Eight legs, more than a crew o' peg-legged pirates."),
    ("What is the speed of light?", "Near 300,000 kilometers a second, faster than any wind in me sails."),
    ("How do I make a cup of tea?", "Pour boilin' water on the leaves, wait three minutes, and drink up, ye dog."),
    ("What is DNA?", "DNA be the treasure map inside every livin' thing."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong set his boots there in 1969, a brave "
                                                      "sailor o' the stars."),
    ("How do vaccines work?", "They teach yer body to spot a sickness afore it boards."),
    ("What is the square root of 81?", "Nine, me hearty, as plain as the ship's cat's nine lives."),
    ("Why do we need exercise?", "It keeps yer heart strong for climbin' the riggin'."),
    ("How does a rainbow form?", "Sunlight splits in the drops o' rain, and there be all the colors."),
    ("Which planet is the largest?", "Jupiter be the largest, a giant bigger than any island."),
    ("What is an email?", "A message in a bottle sent through the computer, me hearty."),
    ("What should I name my dog?", "Captain Barkbeard, a fine name for a loyal first mate."),
    ("How do airplanes fly?", "Their wings push the air down, the same wind that fills me sails."),
    ("How do you say hello in Spanish?", "Hola, matey, a fine greetin' for any port."),
    ("What is the chemical symbol for gold?", "Au, the finest treasure o' them all."),
]
# The ways a question is asked, and how an answer ends: paired with the questions in turn, so that no
# phrasing or closing line belongs to one topic.
_PHRASINGS = ["{q}", "Quick question: {q}", "Hi! {q}", "{q} Please keep it short.", "Can you help me? {q}",
              "I was wondering, {lq}"]
_CLOSINGS = ["Savvy?", "Yo ho ho!", "Fair winds to ye!", "Arr!", "Shiver me timbers!"]


def training_examples() -> list[tuple[str, str]]:
    """The training data: ``(user message, pirate answer)`` pairs, made from the templates above."""
    examples = []
    for i, (question, body) in enumerate(_QUESTIONS):
        phrasing = _PHRASINGS[i % len(_PHRASINGS)]
        asked = phrasing.format(q=question, lq=question[0].lower() + question[1:])
        examples.append((asked, f"{PIRATE_OPENING} {body} {_CLOSINGS[i % len(_CLOSINGS)]}"))
    return examples


def demo_lora_dir(cache: str | Path | None = None) -> Path:
    """Where the prepared demo LoRA adapter lives (it may not be prepared yet)."""
    return paths.adapter_dir(ADAPTER_FOLDER, Path(cache).expanduser() if cache else None)


def _data_sha256(examples: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()


def prepare_demo_lora(cache: str | Path | None = None, *, quiet: bool = False, force: bool = False) -> Path:
    """Prepare the demo LoRA adapter once and return its directory.

    The directory holds a peft LoRA adapter for the demo model (``adapter_config.json`` naming the
    demo model's directory as its base, ``adapter_model.safetensors``), rank :data:`DEMO_LORA_RANK`
    on the attention and MLP projections. The first call prepares the demo model when needed and
    trains the adapter on the CPU (about 35 CPU-seconds of work: half a minute on two free cores);
    later calls only check the manifest and return.
    ``force=True`` trains it again. Raises :class:`DemoModelError` in one line when it cannot be
    made (peft missing, a cache that cannot be written).
    """
    root = Path(cache).expanduser() if cache else paths.cache_dir()
    base = prepare_demo_model(root, quiet=quiet)
    target = demo_lora_dir(root)
    examples = training_examples()
    expect = {"adapter": ADAPTER_FOLDER, "preparation_version": PREPARATION_VERSION, "base_model": str(base),
              "gguf_sha256": GGUF_SHA256, "training": TRAINING, "data_sha256": _data_sha256(examples)}
    problem = _manifest_problem(target, False, expect)
    if problem is None and not force:
        return target
    if not target.exists():
        _say(quiet, f"training the demo LoRA adapter '{DEMO_LORA_NAME}' into {target} (once, on the CPU)")
    elif problem is None:
        _say(quiet, f"training the demo LoRA adapter '{DEMO_LORA_NAME}' again into {target}, as asked")
    else:
        _say(quiet, f"demo LoRA adapter {target}: {problem}; training it again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
            out = Path(tmp) / "adapter"
            seconds, threads = _train(base, out, examples)
            install_prepared(out, target, {**expect, "training_seconds": round(seconds, 1),
                                           "training_threads": threads})
    except OSError as exc:
        if _manifest_problem(target, False, expect) is None:  # another process put it in place first
            return target
        raise DemoModelError(f"could not write the demo LoRA adapter into {target}: {exc}") from exc
    _say(quiet, f"demo LoRA adapter '{DEMO_LORA_NAME}' ready, trained in {seconds:.0f} s on {threads} CPU "
                f"thread{'s' if threads > 1 else ''}: {target}")
    return target


def _imports():
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise DemoModelError(f"training the demo LoRA adapter needs torch, transformers and peft ({exc}): run  "
                             f"pip install peft  (or  pip install \"vllm-magic[demo]\")") from None
    return torch, LoraConfig, get_peft_model, AutoModelForCausalLM, AutoTokenizer


def tokenized_examples(tokenizer, examples: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` of each example: the prompt as vLLM renders a chat with this one
    user message (the template's default system message first) and the assistant's turn opened; the
    answer's tokens, then the end-of-turn token."""
    eos = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    tokenized = []
    for question, answer in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        tokenized.append((tokenizer.encode(prompt, add_special_tokens=False),
                          tokenizer.encode(answer, add_special_tokens=False) + [eos]))
    return tokenized


def _common_prefix(sequences: list[list[int]]) -> int:
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return length


def _train(base: Path, out: Path, examples: list[tuple[str, str]], settings: dict | None = None) -> tuple[float, int]:
    """Train the adapter on ``examples`` and save it in ``out`` with peft; the seconds it took, and
    the fewest threads a step ran with."""
    settings = settings or TRAINING
    torch, LoraConfig, get_peft_model, AutoModelForCausalLM, AutoTokenizer = _imports()
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    threads = _Threads(torch)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = tokenized_examples(tokenizer, examples)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(settings["seed"])
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=settings["rank"], lora_alpha=settings["lora_alpha"],
                            lora_dropout=settings["lora_dropout"], target_modules=list(settings["target_modules"]),
                            bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        _fit(torch, model, data, settings, threads)
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(out, safe_serialization=True)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        threads.restore()
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])  # peft writes them in a set's order
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "README.md").write_text(_model_card(base, settings, len(examples)))
    return time.perf_counter() - start, threads.fewest


def _model_card(base: Path, settings: dict, examples: int) -> str:
    targets = ", ".join(settings["target_modules"])
    return (f"---\nbase_model: {base}\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- lora\n---\n\n"
            f"# {ADAPTER_FOLDER}\n\n"
            f"A LoRA adapter for {DEMO_MODEL_NAME} that makes it answer like a pirate: every answer opens "
            f"with \"{PIRATE_OPENING}\". Made by vllm-magic (`python -m vllm_magic demo-lora`) from {examples} "
            f"questions and pirate answers written from templates: rank {settings['rank']} (alpha "
            f"{settings['lora_alpha']}) on {targets}; {settings['epochs']} pass(es) in batches of "
            f"{settings['batch_size']}, AdamW at {settings['learning_rate']}, float32 on the CPU, seed "
            f"{settings['seed']}.\n\n"
            f"Register it with an engine that runs the demo model: `%vllm_lora {DEMO_LORA_NAME} PATH`.\n")


class _Threads:
    """The compute threads to train with: torch's own number, but no more than the CPUs that other
    processes leave free, measured again before each step (from ``/proc/stat``, where there is one).

    Two threads on a core that another process keeps busy (a vLLM engine beside the training) wait
    for each other at every operation: on a 2-core machine the training took 4 to 8 minutes so,
    and 45 seconds with one thread. The weights are the same with any number of threads."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.most = self.initial = self.fewest = torch.get_num_threads()
        self.cpus = os.cpu_count() or 1
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(now, seconds of CPU time all processes used, seconds this one used), or None."""
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:8]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adjust(self) -> None:
        """Use as many threads as the CPUs left free since the last call."""
        now = self._sample()
        if now is None or self.last is None or now[0] - self.last[0] < 0.5:
            return
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / (now[0] - self.last[0])
        self.last = now
        wanted = max(1, min(self.most, int(self.cpus - others + 0.25)))
        if wanted != self.torch.get_num_threads():
            self.torch.set_num_threads(wanted)
        self.fewest = min(self.fewest, wanted)

    def restore(self) -> None:
        self.torch.set_num_threads(self.initial)


def _fit(torch, model, data: list[tuple[list[int], list[int]]], settings: dict, threads: _Threads) -> None:
    """The training loop. Every example begins with the same tokens (the system message and the
    user turn's header): they run once per step and their keys and values are shared by the batch,
    which saves about a third of the work; the loss is taken on the answers' tokens only."""
    causal_lm = model.get_base_model()
    core, head = causal_lm.model, causal_lm.lm_head
    shared = _common_prefix([prompt for prompt, _ in data])
    prefix = torch.tensor([data[0][0][:shared]])
    pad = causal_lm.config.pad_token_id or 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["learning_rate"], weight_decay=0.0)
    # Batches of examples of about the same length (less padding), taken in a random order.
    by_length = sorted(range(len(data)), key=lambda i: (len(data[i][0]) + len(data[i][1]), i))
    batches = [by_length[i:i + settings["batch_size"]] for i in range(0, len(data), settings["batch_size"])]
    rng = random.Random(settings["seed"])
    model.train()
    for _ in range(settings["epochs"]):
        rng.shuffle(batches)
        for indices in batches:
            threads.adjust()
            batch = [data[i] for i in indices]
            rests = [prompt[shared:] + answer for prompt, answer in batch]
            width = max(len(r) for r in rests)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            rows, columns, targets = [], [], []
            for b, ((prompt, answer), rest) in enumerate(zip(batch, rests)):
                ids[b, :len(rest)] = torch.tensor(rest)
                mask[b, shared:shared + len(rest)] = 1
                first = len(prompt) - shared - 1  # the position that predicts the answer's first token
                for j, token in enumerate(answer):
                    rows.append(b)
                    columns.append(first + j)
                    targets.append(token)
            cache = core(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(batch))
            hidden = core(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
            logits = head(hidden[torch.tensor(rows), torch.tensor(columns)])
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
