"""`nexus-lm`: train, sample from and chat with the language models (MoE LM, hybrid attention/SSM).

    nexus-lm train --config configs/lm.py --config.train.num_steps=300 --workdir runs/lm
    nexus-lm generate --model runs/lm/model --prompt "def " --max-new-tokens 120 --temperature 0.8
    nexus-lm chat --model runs/lm/model --temperature 0.7 --top-p 0.9
    nexus-lm import-hf --from path/to/Mixtral-8x7B --out runs/mixtral/model
    nexus-lm export-hf --model runs/mixtral/model --out exported/mixtral

`train` is `python -m experiments.run` (same config file, `--config.x=y` overrides, presets and
resume); the lm and hybrid experiments write the trained model to `<workdir>/model` (`save_model`:
config JSON + Orbax params + the tokenizer, integrity-checked). `generate` and `chat` load such a
folder (`load_model`), with its tokenizer (byte-level when the folder has none). `import-hf` turns
a Hugging Face Llama / Mistral / Mixtral safetensors folder into such a folder and `export-hf`
writes one back (`models/pretrained`); tokenizers are not converted: use the one the weights were
trained with. Errors are one line; `NEXUS_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from typing import Sequence

LM_FAMILIES = ("lm", "decoder", "hybrid")
TOKENIZER_ASSET = "tokenizer.json"

EXAMPLES = {
    "train": "nexus-lm train --config configs/lm.py --config.train.num_steps=300 --workdir runs/lm",
    "generate": 'nexus-lm generate --model runs/lm/model --prompt "def " --max-new-tokens 120',
    "chat": "nexus-lm chat --model runs/lm/model --temperature 0.7 --top-p 0.9",
    "import-hf": "nexus-lm import-hf --from path/to/Mixtral-8x7B --out runs/mixtral/model",
    "export-hf": "nexus-lm export-hf --model runs/mixtral/model --out exported/mixtral",
}


def load_lm(model_dir: str):
  """(model, params, tokenizer, saved) of a saved LM folder; one-line errors for a wrong folder."""
  from nexus_jax.data.tokenizer import ByteTokenizer, check_vocab, load_tokenizer
  from nexus_jax.models.saving import load_model

  saved = load_model(model_dir, family=LM_FAMILIES)
  model = saved.model
  if TOKENIZER_ASSET in saved.assets:
    tokenizer = load_tokenizer(saved.assets[TOKENIZER_ASSET])
  else:
    tokenizer = ByteTokenizer()
  check_vocab(tokenizer, model.vocab_size, str(saved.path))
  return model, saved.variables["params"], tokenizer, saved


def _sampling(args):
  from nexus_jax.inference.generate import Sampling

  return Sampling(
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      repetition_penalty=args.repetition_penalty,
  )


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
  p.add_argument("--model", required=True, help="a folder written by save_model (<workdir>/model)")
  p.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated (default 200)")
  p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in (0, 1]; 1 = off")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
  p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
  p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")


def _unescape(text: str) -> bytes:
  return text.encode("utf-8").decode("unicode_escape").encode("latin-1")


def build_parser() -> argparse.ArgumentParser:
  from nexus_jax.cli.common import Parser

  parser = Parser(
      prog="nexus-lm",
      description="Train, sample from and chat with nexus_jax language models.",
      epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
  )
  sub = parser.add_subparsers(
      dest="command", metavar="{train,generate,chat,import-hf,export-hf}", parser_class=Parser
  )
  sub.required = True
  sub.add_parser(
      "train",
      help="train an LM (python -m experiments.run; default config configs/lm.py)",
      description="Trains like `python -m experiments.run`: --config FILE (default: configs/lm.py), "
      "--config.a.b=v overrides, --workdir DIR (rerun to resume). Writes <workdir>/model.",
      epilog=f"example:\n  {EXAMPLES['train']}",
      add_help=False,
  )
  gen = sub.add_parser(
      "generate",
      help="continue a prompt",
      description="Continues --prompt with a saved model (sampling or beam search).",
      epilog=f"example:\n  {EXAMPLES['generate']}",
  )
  _add_sampling_flags(gen, temperature=0.8)
  gen.add_argument("--prompt", required=True, help="text to continue")
  gen.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt")
  gen.add_argument("--beam-width", type=int, default=0, help="> 0: beam search (deterministic)")
  gen.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
  gen.add_argument("--json", action="store_true", help="print one JSON object")
  chat = sub.add_parser(
      "chat",
      help="interactive conversation in the terminal",
      description="Chats with a saved model. /reset clears the conversation, /quit exits, "
      "Ctrl-C stops the reply being generated.",
      epilog=f"example:\n  {EXAMPLES['chat']}",
  )
  _add_sampling_flags(chat, temperature=0.7)
  chat.add_argument("--context", type=int, default=1024, help="KV-cache length in tokens")
  chat.add_argument("--stop", default="\\n\\n", help="a reply ends at this text (escapes allowed)")
  chat.add_argument("--user-prefix", default="", help="text before each user line")
  chat.add_argument("--reply-prefix", default="", help="text before each reply")
  imp = sub.add_parser(
      "import-hf",
      help="HF Llama / Mistral / Mixtral safetensors -> a saved model folder",
      description="Reads config.json + safetensors (sharded or not) and writes our saved-model "
      "folder. The tokenizer is not converted: use the one the weights were trained with.",
      epilog=f"example:\n  {EXAMPLES['import-hf']}",
  )
  imp.add_argument("--from", dest="source", required=True, help="HF checkpoint folder")
  imp.add_argument("--out", required=True, help="new folder for the saved model")
  imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="params")
  imp.add_argument("--no-strict", action="store_true", help="initialise missing params, report")
  imp.add_argument("--overwrite", action="store_true", help="replace a previous saved model")
  exp = sub.add_parser(
      "export-hf",
      help="a saved model folder -> HF Llama / Mixtral safetensors",
      description="Writes config.json + safetensors in HF Llama (dense) / Mixtral (MoE) naming.",
      epilog=f"example:\n  {EXAMPLES['export-hf']}",
  )
  exp.add_argument("--model", required=True, help="a folder written by save_model")
  exp.add_argument("--out", required=True, help="new folder for the HF checkpoint")
  exp.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors file")
  exp.add_argument("--overwrite", action="store_true", help="replace a previous export")
  return parser


def run_import_hf(args) -> int:
  import jax.numpy as jnp

  from nexus_jax.models.pretrained import import_hf

  path, report = import_hf(
      args.source,
      args.out,
      dtype=getattr(jnp, args.dtype),
      strict=not args.no_strict,
      overwrite=args.overwrite,
  )
  print(json.dumps({"model_dir": str(path), **report.summary()}, indent=2))
  return 0


def run_export_hf(args) -> int:
  from nexus_jax.models.pretrained import export_safetensors
  from nexus_jax.models.saving import load_model

  saved = load_model(args.model, family=("lm", "decoder"))
  path = export_safetensors(
      saved.model,
      saved.variables["params"],
      args.out,
      max_shard_bytes=args.max_shard_mb << 20,
      overwrite=args.overwrite,
  )
  print(json.dumps({"exported": str(path), "files": sorted(p.name for p in path.iterdir())}))
  return 0


def run_generate(args) -> int:
  import jax

  from nexus_jax.inference.generate import beam_search, generate
  from nexus_jax.inference.stream import step_model_for, stream_tokens

  model, params, tokenizer, _ = load_lm(args.model)
  sampling = _sampling(args)
  prompt = [int(t) for t in tokenizer.encode(args.prompt.encode("utf-8"))]
  if not prompt:
    raise ValueError("--prompt is empty; give at least one character")
  if args.num_samples < 1:
    raise ValueError(f"--num-samples must be >= 1; got {args.num_samples}")
  n = args.max_new_tokens
  rng = jax.random.PRNGKey(args.seed)
  cache = len(prompt) + n
  sm = step_model_for(model, cache)  # the hybrid LM needs its own step model
  if args.stream:
    if args.beam_width or args.num_samples != 1:
      raise ValueError("--stream prints one sample; drop --beam-width / --num-samples")
    from nexus_jax.cli.chat import sigint_flag

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokens = stream_tokens(model, params, prompt, max_new_tokens=n, rng=rng, sampling=sampling)
    with sigint_flag() as stop:  # Ctrl-C ends the stream between two tokens (exit code 130)
      for token in tokens:
        if stop.is_set():
          break
        sys.stdout.write(decoder.decode(tokenizer.token_bytes(token)))
        sys.stdout.flush()
    tokens.close()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    return 130 if stop.is_set() else 0
  if args.beam_width:
    out = beam_search(sm, params, [prompt], beam_width=args.beam_width, max_new_tokens=n)
    rows = [out.tokens[0, 0, : out.lengths[0, 0]].tolist()]
  else:
    out = generate(
        sm, params, [prompt] * args.num_samples, max_new_tokens=n, rng=rng, sampling=sampling
    )
    rows = [out.tokens[i, : out.lengths[i]].tolist() for i in range(args.num_samples)]
  texts = [tokenizer.decode(r).decode("utf-8", "replace") for r in rows]
  if args.json:
    print(json.dumps({"prompt": args.prompt, "completions": texts, "tokens": rows}))
  else:
    print(("\n" + "-" * 40 + "\n").join(args.prompt + t for t in texts))
  return 0


def run_chat(args) -> int:
  from nexus_jax.cli.chat import ChatSession, chat_loop
  from nexus_jax.models.lm import count_params

  model, params, tokenizer, saved = load_lm(args.model)
  session = ChatSession(
      model=model,
      params=params,
      tokenizer=tokenizer,
      sampling=_sampling(args),
      max_new_tokens=args.max_new_tokens,
      context=args.context,
      stop=_unescape(args.stop),
      user_prefix=_unescape(args.user_prefix),
      reply_prefix=_unescape(args.reply_prefix),
      seed=args.seed,
  )
  banner = (
      f"nexus-lm chat: {saved.family} model from {saved.path} "
      f"({count_params(params):,} params, {tokenizer.kind} tokenizer, "
      f"{tokenizer.vocab_size} tokens)"
  )
  return chat_loop(session, banner=banner)


def run_train(argv: Sequence[str]) -> int:
  from experiments.run import train_command

  if any(a in ("-h", "--help") for a in argv):
    build_parser().parse_args(["train", "--help"])  # exits
  from nexus_jax.cli.common import packaged_config

  results = train_command(list(argv), default_config=str(packaged_config("lm.py")))
  model_dir = results.get("model_dir")
  print(json.dumps(results, indent=2, default=str))
  if model_dir:
    print(f"\nmodel saved to {model_dir}; try:  nexus-lm chat --model {model_dir}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from nexus_jax.cli.common import run_main

  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "train":
    return run_main("nexus-lm", lambda: run_train(argv[1:]))

  def run() -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "generate": run_generate,
        "chat": run_chat,
        "import-hf": run_import_hf,
        "export-hf": run_export_hf,
    }
    return commands[args.command](args)

  return run_main("nexus-lm", run)


if __name__ == "__main__":
  sys.exit(main())
