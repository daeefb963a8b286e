"""`nexusflow`: train, predict with, optimise, package and serve NexusFlow (multi-table) models.

    nexusflow train --config.data.path=my_tables/ --workdir runs/orders --optimize quantization
    nexusflow predict --artifact runs/orders/artifact --data new_tables/ --output preds.csv
    nexusflow optimize --model runs/orders/artifact --method int4 --group-size 64 --output runs/int4
    nexusflow optimize --model runs/orders/artifact --target-size-mb 0.1 --output runs/small
    nexusflow package --model runs/orders/artifact --output dist/orders --target production --zip
    nexusflow package verify dist/orders
    nexusflow serve --model runs/orders/artifact --port 8000

`train` is `python -m experiments.run` (`experiments.run.train_command`: the same config file,
default the installed configs/tabular.py, `--config.a.b=v` overrides, presets, resume); `predict`
is `nexus_jax.nexusflow.predict_cli`; the others are thin wrappers over `artifact_optimize`,
`size_target`, `package` and `server`. Inputs are never modified; an existing output folder is
refused unless `--overwrite`, and even then only a previous artifact / package is replaced.
Errors are one line (`nexus_jax.cli.common`); `NEXUS_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

from nexus_jax.cli.common import (
    CommandError,
    Parser,
    UsageError,
    check_output_dir,
    did_you_mean,
    format_bytes,
    packaged_config,
    run_main,
)

PROG = "nexusflow"
EXAMPLES = {
    "train": "nexusflow train --config.data.path=my_tables/ --workdir runs/orders "
    "--optimize quantization",
    "predict": "nexusflow predict --artifact runs/orders/artifact --data new_tables/ "
    "--output preds.csv",
    "optimize": "nexusflow optimize --model runs/orders/artifact --method pruning --amount 0.3 "
    "--output runs/orders/pruned\n  nexusflow optimize --model runs/orders/artifact "
    "--target-size-mb 0.1 --eval-data eval_tables/ --output runs/orders/small",
    "package": "nexusflow package --model runs/orders/artifact --output dist/orders "
    "--target production --zip\n  nexusflow package verify dist/orders",
    "serve": "nexusflow serve --model runs/orders/artifact --host 127.0.0.1 --port 8000",
}
TRAIN_OPTIMIZE = {"quantization": "int8", "pruning": "prune", "none": None}
METHODS = {"int8": "int8", "int4": "int4", "pruning": "prune"}


def _example(name: str) -> str:
  return f"{'examples' if chr(10) in EXAMPLES[name] else 'example'}:\n  {EXAMPLES[name]}"


def build_parser(command: str | None = None) -> Parser:
  """The parser; `command` == "predict" adds predict_cli's flags (that import takes seconds, so
  the other commands' help and parsing skip it)."""
  parser = Parser(
      prog=PROG,
      description="Train, predict with, optimise, package and serve NexusFlow multi-table models.",
      epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
  sub.required = True
  sub.add_parser(
      "train",
      help="train a model (python -m experiments.run; default config: configs/tabular.py)",
      description="Trains like `python -m experiments.run`: --config FILE (default: the installed "
      "configs/tabular.py), --config.a.b=v overrides, --workdir DIR (rerun to resume).\n"
      "--optimize quantization|pruning|none also writes <workdir>/artifact_int8 (or "
      "artifact_pruned, config.eval.prune_amount of the weights) and reports its size and the "
      "test-metric change the run measured; <workdir>/artifact stays the float model.",
      epilog=_example("train"),
      add_help=False,
  )
  predict = sub.add_parser(
      "predict",
      help="predict from an artifact on a folder of tables",
      description="Predicts every row of the target table in --data (one file per table) and "
      "writes a CSV: the key, `prediction` and, for classifiers, one proba_<class> per class.",
      epilog=_example("predict"),
  )
  if command == "predict":
    from nexus_jax.nexusflow import predict_cli

    predict_cli.add_arguments(predict)
  opt = sub.add_parser(
      "optimize",
      help="write an int8 / int4 / pruned copy of an artifact, or the least lossy under a size",
      description="Writes a new artifact (--model is never modified). --method int8 | int4 "
      "(--group-size rows per scale) | pruning (--amount of the weights zeroed by magnitude).\n"
      "--target-size-mb S instead picks the least lossy candidate whose params on disk fit S "
      "decimal MB: the model as it is, int8, int4 g32 < g64 < g128, pruning 0.3 < 0.5 < 0.7 < 0.9 "
      "(that order, or the best primary metric on --eval-data when given; --method limits the "
      "candidates to one kind). Sizes are bytes on disk of params/, measured after writing.",
      epilog=_example("optimize"),
  )
  opt.add_argument("--model", required=True, help="artifact folder to optimise")
  opt.add_argument("--method", choices=sorted(METHODS), default=None, help="what to apply")
  opt.add_argument("--amount", type=float, default=None, help="pruning: share zeroed (0.5)")
  opt.add_argument("--group-size", type=int, default=None, help="int4: rows per scale (64)")
  opt.add_argument("--target-size-mb", type=float, default=None, help="params must fit this")
  opt.add_argument("--eval-data", default=None, help="labelled folder of tables: metric change")
  opt.add_argument("--output", required=True, help="new folder for the optimised artifact")
  opt.add_argument("--overwrite", action="store_true", help="replace a previous artifact there")
  opt.add_argument("--json", action="store_true", help="print the report as JSON")
  pkg = sub.add_parser(
      "package",
      help="one self-contained, integrity-checked folder (and .zip) with a model card",
      description="Writes --output: artifact/, model_card.json, MODEL_CARD.md, README.md (the "
      "predict / serve commands) and SHA256SUMS.\n--target standard: the artifact as it is, "
      "with the run's results.json and plots; production: int8-quantised (unless already "
      "quantised), no training curves or plots.\n`nexusflow package verify DIR|ZIP` re-checks "
      "every file.",
      epilog=_example("package"),
  )
  pkg.add_argument("--model", required=True, help="artifact folder to package")
  pkg.add_argument("--output", required=True, help="new folder for the package")
  pkg.add_argument("--target", choices=("standard", "production"), default="standard")
  pkg.add_argument("--zip", action="store_true", help="also write <output>.zip")
  pkg.add_argument("--overwrite", action="store_true", help="replace a previous package there")
  serve = sub.add_parser(
      "serve",
      help="serve an artifact over HTTP (FastAPI + uvicorn)",
      description='GET /health, GET /schema, POST /predict with {"tables": {name: [rows]}, '
      "\"predict_from\": null}. Needs the serve extra: pip install 'nexus_jax[serve]'.",
      epilog=_example("serve"),
  )
  serve.add_argument("--model", required=True, help="artifact folder to serve")
  serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
  serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
  return parser


def verify_parser() -> Parser:
  p = Parser(
      prog=f"{PROG} package verify",
      description="Re-checks a package: every file against SHA256SUMS and model_card.json, no "
      "file missing or added, and the artifact's own manifest.",
      epilog="example:\n  nexusflow package verify dist/orders",
  )
  p.add_argument("path", help="package folder or its .zip")
  return p


# -------------------------------------------------------------------------------------- train
def _pop_flag(argv: list[str], flag: str) -> tuple[list[str], str | None]:
  """(argv without `flag VALUE` / `flag=VALUE`, VALUE or None)."""
  rest, value, i = [], None, 0
  while i < len(argv):
    arg = argv[i]
    if arg == flag:
      if i + 1 >= len(argv):
        raise UsageError(f"{PROG} train: {flag} needs a value: {' | '.join(TRAIN_OPTIMIZE)}")
      value, i = argv[i + 1], i + 2
      continue
    if arg.startswith(flag + "="):
      value = arg.split("=", 1)[1]
    else:
      rest.append(arg)
    i += 1
  return rest, value


def run_train(argv: Sequence[str]) -> int:
  argv = list(argv)
  if "-h" in argv or "--help" in argv:
    build_parser("train").parse_args(["train", "--help"])  # prints the help, exits 0
  from experiments.run import parse_train_args, run_train_args

  argv, choice = _pop_flag(argv, "--optimize")
  choice = "none" if choice is None else choice
  if choice not in TRAIN_OPTIMIZE:
    raise UsageError(
        f"{PROG} train: --optimize {choice!r}{did_you_mean(choice, TRAIN_OPTIMIZE)}; choose one "
        f"of {', '.join(TRAIN_OPTIMIZE)}"
    )
  args = parse_train_args(argv, default_config=packaged_config("tabular.py"))
  method = TRAIN_OPTIMIZE[choice]
  if method is not None:
    _check_optimizable(args.config, choice)
  results = run_train_args(args)
  if method is not None:
    results["optimized"] = optimize_trained(results, method, float(args.config.eval.prune_amount))
  print(json.dumps(results, indent=2, default=str))
  if method is not None:
    o = results["optimized"]
    change = o.get("test_change")
    measured = (
        ", ".join(f"{k} {v:+.4f}" for k, v in change.items())
        if change
        else "not measured (config.eval.optimize=False or no test rows)"
    )
    print(
        f"\n{o['label']}: params on disk {format_bytes(o['params_bytes_before'])} -> "
        f"{format_bytes(o['params_bytes_after'])}; test change {measured}; wrote {o['output']}"
    )
  return 0


def _check_optimizable(config: Any, choice: str) -> None:
  """--optimize needs a run that writes a NexusFormer artifact: checked before training."""
  if config.experiment != "tabular" or config.model.get("name") != "nexus_former":
    raise UsageError(
        f"{PROG} train: --optimize {choice} applies to the tabular NexusFormer artifact; this "
        f"config trains experiment={config.experiment!r} model.name={config.model.get('name')!r}"
    )
  if not config.eval.save_artifact:
    raise UsageError(
        f"{PROG} train: --optimize {choice} needs the artifact, but config.eval.save_artifact="
        "False; drop --optimize or the override"
    )


def optimize_trained(results: dict[str, Any], method: str, prune_amount: float) -> dict[str, Any]:
  """Writes <workdir>/artifact_int8 | artifact_pruned from the run's artifact; the test-metric
  change is the one the run measured (results["optimization"], config.eval.optimize)."""
  from nexus_jax.nexusflow.artifact_optimize import Variant, write_optimized

  source = pathlib.Path(results["artifact"])
  variant = Variant("prune", amount=prune_amount) if method == "prune" else Variant(method)
  output = source.parent / ("artifact_pruned" if method == "prune" else "artifact_int8")
  report = write_optimized(source, output, variant)
  measured = (results.get("optimization") or {}).get(method)
  if measured and "change" in measured:
    report["test_change"] = measured["change"]
  return report


# -------------------------------------------------------------------------------------- optimize
def run_optimize(args: Any) -> int:
  from nexus_jax.nexusflow.artifact import _is_artifact

  output = check_output_dir(
      args.output, args.overwrite, _is_artifact, "artifact", inputs=[args.model]
  )
  if args.target_size_mb is not None:
    if args.amount is not None or args.group_size is not None:
      raise UsageError(
          f"{PROG} optimize: --target-size-mb chooses the amount / group size itself; drop "
          "--amount / --group-size (or --target-size-mb)"
      )
    if not args.target_size_mb > 0:
      raise UsageError(f"{PROG} optimize: --target-size-mb {args.target_size_mb:g}; must be > 0")
    from nexus_jax.nexusflow.size_target import MB, fit_to_size

    methods = None if args.method is None else [METHODS[args.method]]
    report = fit_to_size(
        args.model, args.target_size_mb * MB, output, eval_data=args.eval_data, methods=methods
    )
    print(json.dumps(report, indent=2) if args.json else size_summary(report))
    return 0
  if args.method is None:
    raise UsageError(f"{PROG} optimize: give --method int8|int4|pruning or --target-size-mb S")
  report = optimize_one(args, output)
  print(json.dumps(report, indent=2) if args.json else one_summary(report))
  return 0


def optimize_one(args: Any, output: pathlib.Path) -> dict[str, Any]:
  """--method: one variant, with the metric change on --eval-data when given."""
  from nexus_jax.nexusflow.artifact import load_artifact
  from nexus_jax.nexusflow.artifact_optimize import Variant, write_optimized

  method = METHODS[args.method]
  if args.group_size is not None and method != "int4":
    raise UsageError(f"{PROG} optimize: --group-size applies to --method int4 only")
  if args.amount is not None and method != "prune":
    raise UsageError(f"{PROG} optimize: --amount applies to --method pruning only")
  if args.group_size is not None and args.group_size < 1:
    raise UsageError(f"{PROG} optimize: --group-size {args.group_size}; must be >= 1")
  variant = Variant(
      method,
      group_size=args.group_size if method == "int4" else None,
      amount=(0.5 if args.amount is None else args.amount) if method == "prune" else None,
  )
  base = load_artifact(args.model)
  scoring = _eval_setup(base, args.eval_data) if args.eval_data else None
  report = write_optimized(args.model, output, variant, predictor=base)
  if scoring is not None:
    from nexus_jax.nexusflow.scoring import score_arrays

    arrays, fn, before = scoring
    after = score_arrays(load_artifact(output), arrays, fn)
    report.update(
        metrics_before=before, metrics_after=after, change={k: after[k] - before[k] for k in before}
    )
  return report


def _eval_setup(base: Any, folder: str):
  from nexus_jax.nexusflow.predict_cli import read_tables
  from nexus_jax.nexusflow.scoring import labelled_arrays, score_arrays, shared_predict_fn

  arrays = labelled_arrays(base, read_tables(folder, base.schema), where="--eval-data")
  fn = shared_predict_fn(base)
  return arrays, fn, score_arrays(base, arrays, fn)


def one_summary(report: dict[str, Any]) -> str:
  lines = [
      f"{report['label']}: params on disk {report['params_bytes_before']:,} -> "
      f"{report['params_bytes_after']:,} bytes, stored arrays {report['array_bytes_before']:,} -> "
      f"{report['array_bytes_after']:,} bytes; wrote {report['output']}"
  ]
  if "change" in report:
    lines.append(
        "eval metrics: "
        + ", ".join(
            f"{k} {report['metrics_before'][k]:.4f} -> {v:.4f} ({report['change'][k]:+.4f})"
            for k, v in report["metrics_after"].items()
        )
    )
  return "\n".join(lines)


def size_summary(report: dict[str, Any]) -> str:
  metric = report["metric"]
  with_eval = "metrics_before" in report
  head = f"{'candidate':<12}{'on disk':>12}{'arrays':>12}  fits"
  lines = [f"target: params on disk <= {report['target_bytes']:,} bytes", head]
  if with_eval:
    lines[1] += f"  {metric} (change)"
  for row in report["candidates"]:
    if "skipped" in row:
      lines.append(f"{row['label']:<12}{'-':>12}{'-':>12}  skipped: {row['skipped']}")
      continue
    line = (
        f"{row['label']:<12}{row['params_bytes']:>12,}{row['array_bytes']:>12,}  "
        f"{'yes' if row['fits'] else 'no':<4}"
    )
    if with_eval:
      line += f"  {row['metrics'][metric]:.4f} ({row['change'][metric]:+.4f})"
    lines.append(line)
  lines.append(
      f"chosen: {report['chosen']} ({report['chosen_by']}): params on disk "
      f"{report['params_bytes_before']:,} -> {report['params_bytes_after']:,} bytes; wrote "
      f"{report['output']}"
  )
  return "\n".join(lines)


# -------------------------------------------------------------------------------------- package
def run_package(args: Any) -> int:
  from nexus_jax.nexusflow.package import (
      is_package,
      is_package_zip,
      package_artifact,
      zip_path,
  )

  output = check_output_dir(args.output, args.overwrite, is_package, "package", inputs=[args.model])
  archive = zip_path(output)
  if args.zip and archive.exists():
    if not args.overwrite:
      raise CommandError(f"--zip: {archive} already exists; pass --overwrite to replace it")
    if not is_package_zip(archive):
      raise CommandError(f"--zip: {archive} is not a package zip; it was left untouched")
  report = package_artifact(args.model, output, target=args.target, zip=args.zip)
  print(
      f"packaged {args.model} ({args.target}: {', '.join(report['optimization']) or 'float32'}) "
      f"into {report['output']}: {report['files']} files, {format_bytes(report['bytes'])}, "
      f"params {format_bytes(report['params_bytes'])}"
      + (f"; zip {report['zip']}" if report["zip"] else "")
  )
  print(f"check it with: nexusflow package verify {report['output']}")
  return 0


def run_verify(argv: Sequence[str]) -> int:
  from nexus_jax.nexusflow.package import SUMS, verify_package

  args = verify_parser().parse_args(list(argv))
  card = verify_package(args.path)
  n = len(card.get("files") or {})
  print(f"ok: {args.path}: every file matches {SUMS} ({n} payload files + card), artifact verified")
  return 0


# -------------------------------------------------------------------------------------- serve
def run_serve(args: Any) -> int:
  if not 0 < args.port < 65536:
    raise UsageError(f"{PROG} serve: --port {args.port}; must be in 1..65535")
  try:
    import uvicorn  # noqa: PLC0415 (optional dependency)

    from nexus_jax.nexusflow.server import create_app, require_fastapi

    require_fastapi()
  except ImportError as err:
    raise CommandError(f"serve needs the serve extra: pip install 'nexus_jax[serve]' ({err})")
  app = create_app(args.model)
  print(f"serving {args.model} on http://{args.host}:{args.port} (/health, /schema, /predict)")
  uvicorn.run(app, host=args.host, port=args.port, log_level="info")
  return 0


def dispatch(argv: list[str]) -> int:
  if argv and argv[0] == "train":
    return run_train(argv[1:])
  if argv[:2] == ["package", "verify"]:
    return run_verify(argv[2:])
  args = build_parser(argv[0] if argv else None).parse_args(argv)
  if args.command == "predict":
    from nexus_jax.nexusflow import predict_cli

    return predict_cli.run(args)
  return {"optimize": run_optimize, "package": run_package, "serve": run_serve}[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  return run_main(PROG, lambda: dispatch(argv))


if __name__ == "__main__":
  sys.exit(main())
