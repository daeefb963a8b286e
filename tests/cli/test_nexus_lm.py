"""`nexus-lm`: generate and chat on a saved tiny LM (byte-level and with a BPE tokenizer saved as
an asset), the chat driven through stdin and through a pseudo-terminal (Ctrl-C stops a reply, not
the program), `--help` with an example, and one-line errors for a wrong folder or tokenizer."""

import json
import json.decoder
import json.encoder
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from nexus_jax.cli.nexus_lm import main
from nexus_jax.data.tokenizer import ByteTokenizer, train_tokenizer
from nexus_jax.inference.generate import generate
from nexus_jax.models.lm import LanguageModel
from nexus_jax.models.saving import save_model
from nexus_jax.models.transformer import Encoder
from nexus_jax.testing import stdlib_text_folder

CORPUS = [pathlib.Path(m.__file__).read_bytes() for m in (json.decoder, json.encoder, shutil)]


def _tiny(vocab):
  model = LanguageModel.from_preset("tiny", vocab_size=vocab, embed_dim=16, mlp_dim=32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
  model, params = _tiny(256)
  path = save_model(tmp_path_factory.mktemp("m") / "byte", model, {"params": params})
  return path, model, params


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("bpe")
  tokenizer = train_tokenizer("bpe", CORPUS, 300)
  tokenizer.save(root / "tokenizer.json")
  model, params = _tiny(tokenizer.vocab_size)
  path = save_model(
      root / "model", model, {"params": params}, assets={"tokenizer.json": root / "tokenizer.json"}
  )
  return path, model, params, tokenizer


def _cli(*args, input=None, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  exe = shutil.which("nexus-lm") or sys.executable
  cmd = [exe, *args] if exe.endswith("nexus-lm") else [exe, "-m", "nexus_jax.cli.nexus_lm", *args]
  return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)


def test_greedy_generate_prints_generates_tokens(byte_model, capsys):
  path, model, params = byte_model
  prompt = "def "
  expected = generate(model, params, [list(prompt.encode())], max_new_tokens=12)
  code = main(
      ["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12"]
      + ["--temperature", "0", "--json"]
  )
  out = json.loads(capsys.readouterr().out)
  assert code == 0 and out["tokens"] == [expected.tokens[0].tolist()]


def test_streamed_generate_equals_the_batch_one(bpe_model, capsys):
  path, model, params, tokenizer = bpe_model
  args = ["generate", "--model", str(path), "--prompt", "class ", "--max-new-tokens", "10"]
  args += ["--temperature", "0.9", "--seed", "3"]
  assert main(args + ["--json"]) == 0
  batch = json.loads(capsys.readouterr().out)["completions"][0]
  assert main(args + ["--stream"]) == 0
  streamed = capsys.readouterr().out
  assert streamed == batch + "\n"


def test_chat_over_stdin_answers_resets_and_quits(bpe_model):
  path = bpe_model[0]
  proc = _cli(
      "chat",
      "--model",
      str(path),
      "--max-new-tokens",
      "8",
      "--context",
      "64",
      input="hello\n/reset\n/nonsense\nagain\n/quit\n",
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "bpe tokenizer" in out and out.count("model> ") == 2
  assert "(conversation cleared)" in out and "unknown command '/nonsense'" in out


# Drives the chat through a pseudo-terminal from a process without JAX (forking the test process,
# which runs JAX threads, could deadlock). Prints the exit status and what the terminal showed.
PTY_DRIVER = """
import json, sys, time, pexpect
exe, model = sys.argv[1], sys.argv[2]
child = pexpect.spawn(exe, ["chat", "--model", model, "--max-new-tokens", "20000",
                            "--context", "20100", "--stop", "", "--temperature", "1.0"],
                      encoding="utf-8", timeout=240)
child.expect("you> ")
child.sendline("tell me everything")
child.expect("model> ")
time.sleep(3.0)  # compiled and streaming by now: 20,000 tokens take far longer
child.sendintr()
child.expect(r"\\[stopped\\]")
child.expect("you> ")
child.sendline("/quit")
child.expect(pexpect.EOF)
child.wait()
print(json.dumps({"exit": child.exitstatus, "signal": child.signalstatus}))
"""


def test_ctrl_c_in_a_terminal_stops_the_reply_not_the_program(byte_model):
  pytest.importorskip("pexpect")
  exe = shutil.which("nexus-lm")
  assert exe, "the nexus-lm console script is not installed (pip install -e .)"
  proc = subprocess.run(
      [sys.executable, "-c", PTY_DRIVER, exe, str(byte_model[0])],
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"exit": 0, "signal": None}


def test_help_has_an_example_and_bad_input_is_one_line(tmp_path, bpe_model, capsys):
  for sub in ("generate", "chat", "train"):
    assert main([sub, "--help"]) == 0 and "example" in capsys.readouterr().out
  assert main(["chat", "--model", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("nexus-lm: error:") and len(err.splitlines()) == 1
  # A model of another family.
  encoder = Encoder(num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, vocab_size=32, head="none")
  variables = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  other = save_model(tmp_path / "encoder", encoder, {"params": variables["params"]})
  assert main(["generate", "--model", str(other), "--prompt", "x"]) == 2
  assert "encoder" in capsys.readouterr().err
  # A tokenizer that does not match the model's vocabulary.
  path, model, params, _ = bpe_model
  wrong = train_tokenizer("bpe", CORPUS, 280)
  wrong.save(tmp_path / "wrong.json")
  mismatched = save_model(
      tmp_path / "mismatched",
      model,
      {"params": params},
      assets={"tokenizer.json": tmp_path / "wrong.json"},
  )
  assert main(["chat", "--model", str(mismatched)]) == 2
  err = capsys.readouterr().err
  assert "280" in err and str(model.vocab_size) in err and len(err.strip().splitlines()) == 1
  assert main(["chatt", "--model", str(path)]) == 2
  assert "did you mean 'chat'" in capsys.readouterr().err


def test_train_then_generate_from_the_saved_model(tmp_path, capsys):
  """`nexus-lm train` is the runner on the packaged configs/lm.py; its workdir/model generates."""
  folder = stdlib_text_folder(tmp_path / "corpus", count=30)
  work = tmp_path / "run"
  overrides = {
      "data.root": folder,
      "data.valid_fraction": 0.2,
      "data.test_fraction": 0.2,
      "data.seq_len": 32,
      "data.valid_bytes": 1024,
      "data.test_bytes": 2048,
      "data.tokenizer": "bpe",
      "data.vocab_size": 384,
      "model.num_layers": 1,
      "model.embed_dim": 32,
      "model.num_heads": 2,
      "model.num_kv_heads": 1,
      "model.mlp_dim": 32,
      "model.train_dense_baseline": False,
      "train.batch_size": 8,
      "train.num_steps": 8,
      "train.eval_every_steps": 4,
      "train.progress": False,
      "train.tensorboard": False,
      "optim.warmup_steps": 2,
      "sample.num_bytes": 8,
  }
  args = [f"--config.{k}={v}" for k, v in overrides.items()] + ["--workdir", str(work)]
  assert main(["train", *args]) == 0
  shown = capsys.readouterr().out
  model_dir = work / "model"
  assert f"nexus-lm chat --model {model_dir}" in shown
  assert main(["generate", "--model", str(model_dir), "--prompt", "def ", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out["tokens"][0]) == 200 and max(out["tokens"][0]) < 384
  assert main(["train", "--config.data.tokenizr=bpe", "--workdir", str(work)]) == 2
  assert "did you mean" in capsys.readouterr().err.lower()
