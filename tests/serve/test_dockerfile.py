"""The Dockerfile cannot be built here (no Docker engine on these machines), so this checks what can
be checked without one: every path it copies exists, the extras it installs are declared, and its
entrypoint is a command line the server accepts."""

import json
import pathlib
import re
import tomllib

from nexus_jax.serve.__main__ import build_parser

ROOT = pathlib.Path(__file__).parents[2]


def test_dockerfile_copies_existing_paths_and_runs_a_valid_server_command():
  text = (ROOT / "Dockerfile").read_text()
  for line in re.findall(r"^COPY (.+)$", text, re.M):
    *sources, _ = line.split()
    for src in sources:
      assert (ROOT / src).exists(), src
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  default = re.search(r"^ARG EXTRAS=(\S+)$", text, re.M).group(1)
  assert set(default.split(",")) <= set(extras)
  entry = json.loads(re.search(r"^ENTRYPOINT (\[.+\])$", text, re.M).group(1))
  assert entry[:3] == ["python", "-m", "nexus_jax.serve"]
  args = build_parser().parse_args(entry[3:])
  assert args.artifact == "/artifact" and args.host == "0.0.0.0" and args.port == 8000
  assert "EXPOSE 8000" in text
