"""A stand-in for the `swift` CLI in the chaos run: `sft` writes what ms-swift writes (a
`vN-<time>` run directory with `logging.jsonl` rows, `checkpoint-N` directories completed by
their `trainer_state.json`, a closing row naming the last checkpoint) at a steady pace, resumes
from `--resume_from_checkpoint`, and on SIGTERM saves a checkpoint, writes the closing row with
the step it reached and exits 0 as ms-swift does;
`export` writes the merged model's `config.json`.

Each process records its start and its end, with its job tag, node and GPUs, in the ledger file
named by CHAOS_LEDGER: a record kept outside Redis of what really ran, and where.

Standard library only, run with `python -S`: it starts in a few milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

STEP_S = float(os.environ.get("CHAOS_STEP_S", "0.15"))


def flags(argv: list[str]) -> dict[str, str]:
    found = {}
    for index, arg in enumerate(argv):
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            found[name] = value if equals else (argv[index + 1] if index + 1 < len(argv) else "")
    return found


def record(event: str, **fields: object) -> None:
    """One line per record, appended in one write: lines of concurrent processes never mix."""
    ledger = os.environ.get("CHAOS_LEDGER")
    if not ledger:
        return
    line = {
        "event": event,
        "pid": os.getpid(),
        "tag": os.environ.get("SWIFT_TRAINER_JOB", ""),
        "node": os.environ.get("NODE_NAME", ""),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "t": time.time(),
        **fields,
    }
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def append_row(path: Path, row: dict[str, object]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def save_checkpoint(run: Path, step: int, max_steps: int) -> Path:
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "adapter_config.json").write_text("{}")
    # Written last, as the trainer does: the runner takes a checkpoint as complete once it exists.
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return checkpoint


def sft(options: dict[str, str]) -> int:
    output = Path(options["output_dir"])
    output.mkdir(parents=True, exist_ok=True)
    version = sum(1 for p in output.glob("v*-*") if p.is_dir())
    run = output / f"v{version}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir()
    rows = run / "logging.jsonl"
    max_steps = int(options.get("max_steps") or 10)
    save_steps = int(options.get("save_steps") or max_steps)
    logging_steps = int(options.get("logging_steps") or 1)
    resumed = options.get("resume_from_checkpoint", "")
    step = int(resumed.rsplit("-", 1)[-1]) if resumed.rsplit("-", 1)[-1].isdigit() else 0
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    record("start", output_dir=str(run), from_step=step)
    started = time.monotonic()
    last = None
    while step < max_steps and not stopping:
        time.sleep(STEP_S)
        step += 1
        if step % logging_steps == 0 or step == max_steps:
            elapsed = time.monotonic() - started
            append_row(
                rows,
                {
                    "loss": round(2.0 / (1 + step), 4),
                    "learning_rate": 1e-4,
                    "epoch": round(step / max_steps, 4),
                    "global_step/max_steps": f"{step}/{max_steps}",
                    "elapsed_time": f"{int(elapsed)}s",
                    "remaining_time": f"{int(STEP_S * (max_steps - step))}s",
                },
            )
        if step % save_steps == 0 or step == max_steps:
            last = save_checkpoint(run, step, max_steps)
    if stopping and step and (last is None or not last.name.endswith(f"-{step}")):
        last = save_checkpoint(run, step, max_steps)  # the jit checkpoint on SIGTERM
    # The closing row, written after a stop too (as ms-swift does): only its global_step tells
    # a stopped run from a finished one.
    runtime = time.monotonic() - started
    append_row(
        rows,
        {
            "train_runtime": round(runtime, 3),
            "global_step/max_steps": f"{step}/{max_steps}",
            "last_model_checkpoint": str(last) if last else None,
            "global_step": step,
        },
    )
    record("end", step=step, stopped=stopping)
    return 0


def export(options: dict[str, str]) -> int:
    output = Path(options["output_dir"])
    record("export-start", output_dir=str(output), adapters=options.get("adapters", ""))
    output.mkdir(parents=True, exist_ok=True)
    time.sleep(STEP_S * 2)
    (output / "config.json").write_text(json.dumps({"merged_from": options.get("adapters", "")}))
    record("export-end", output_dir=str(output))
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: swift {sft,export} [--flag value ...]", file=sys.stderr)
        return 2
    command, options = argv[0], flags(argv[1:])
    if command == "sft":
        return sft(options)
    if command == "export":
        return export(options)
    print(f"error: the stand-in does not implement `swift {command}`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
