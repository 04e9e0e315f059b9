"""Runs hostile CLI cases one after another in this one process (torch and transformers imported
once, not once per case): each case's `main(argv)` with its own environment, working folder, and
stdout/stderr captured at the file descriptors (print, every logger, C code).

    python tests/hostile_worker.py cases.json results.json
cases.json: [{"id", "module", "args", "env", "cwd"}]; results.json: {id: {"returncode", "stdout", "stderr"}}.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile


@contextlib.contextmanager
def captured() -> dict:
    """stdout and stderr of everything in the process, at fds 1 and 2, while inside."""
    out: dict = {}
    files = [tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")]
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        yield out
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for name, file in zip(("stdout", "stderr"), files):
            file.seek(0)
            out[name] = file.read()
            file.close()


def run(case: dict) -> dict:
    import mlflow

    environ, cwd = dict(os.environ), os.getcwd()
    os.environ.update(case["env"])
    os.chdir(case["cwd"])
    code = 1
    try:
        with captured() as out:
            try:
                code = importlib.import_module(case["module"]).main(case["args"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException as err:  # noqa: BLE001 - reported as the case's failure
                import traceback

                traceback.print_exc()
                code = f"raised {type(err).__name__}"
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")
        mlflow.set_tracking_uri(None)  # the next case starts from its own environment
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    return {"returncode": code, **out}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    results = {case["id"]: run(case) for case in cases}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
