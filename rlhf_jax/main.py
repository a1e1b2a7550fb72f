"""Entry point: `python -m rlhf_jax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]`.

Exit status: 0 done; 75 preempted (checkpoint saved, re-run to continue);
3 non-finite loss; 2 bad config or input; 1 anything else. Failures print one
clear line on stderr.
"""
from __future__ import annotations

import os
import sys
import traceback

from rlhf_jax.hostenv import cpu_defaults

cpu_defaults()  # before absl/ml_collections or anything else can initialise JAX

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/NAME.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2


def _fail(code: int, msg: str):
  print(f"rlhf_jax: error: {msg}", file=sys.stderr, flush=True)
  if os.environ.get("RLHF_JAX_TRACEBACK"):
    traceback.print_exc()
  os._exit(code)  # skip atexit hooks that could block on a broken state


def _parse_flags(argv):
  """Bad --config overrides: one line and exit 2 (absl would print two lines and exit 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # e.g. --config.model.d_model=abc
    _fail(EXIT_BAD_INPUT, str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # a --config.KEY the config does not have
    name = str(e).strip("\"' ")
    keys = [a[2:].split("=", 1)[0] for a in argv[1:]
            if a.startswith("--config.") and name in a[2:].split("=", 1)[0].split(".")]
    _fail(EXIT_BAD_INPUT, f"{keys[0] if keys else name}: no such config key")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from rlhf_jax import config_lib, pipeline
  from rlhf_jax.data.formats import DataError
  from rlhf_jax.train.checkpoint import CheckpointMismatch
  from rlhf_jax.train.loop import NonFinite, Preempted
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, CheckpointMismatch, FileNotFoundError) as e:
    _fail(EXIT_BAD_INPUT, str(e))
  except (Preempted, NonFinite) as e:
    _fail(e.exit_code, str(e))
  except KeyboardInterrupt:
    _fail(130, "interrupted; re-run the same command to continue from the last checkpoint")
  except Exception as e:  # pylint: disable=broad-except
    _fail(1, f"{type(e).__name__}: {e}".splitlines()[0] + " (RLHF_JAX_TRACEBACK=1 for details)")


def run():
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit:
    raise
  except Exception as e:  # a config override that does not parse, before main runs
    _fail(EXIT_BAD_INPUT, f"{type(e).__name__}: {e}".splitlines()[0])


if __name__ == "__main__":
  run()
