"""
cmdline.py -- what every script needs and the model does not: one-line errors, devices, timings,
atomic writes, and the command line built from a script's Config.

    UserError        bad input: one line on stderr, exit code 2 (run_cli), never a traceback
    run_cli          a script's entry point: errors, Ctrl-C (exit 130) and warnings as one line
    check_output     can an output be written? (checked before any model is loaded)
    resolve_device   --device, or cuda when there is one
    atomic_write     outputs are written to a temp file and renamed: never half-written
    config_parser    argparse from a @dataclass Config, each field's comment as its help
    mean_se          mean and standard error, as every reported number has them
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import resource
import sys
import tempfile
import warnings

import torch

import model


class UserError(Exception):
    """Bad input to a script: reported as one line on stderr with exit code 2, no traceback."""


def run_cli(name: str, main, parse_args, argv=None) -> int:
    """A script's command-line entry: main(parse_args(argv)).

    A UserError becomes one line on stderr and exit code 2 (never a traceback; main checks
    before it writes). Ctrl-C becomes one line and exit code 130 (every output is written
    atomically, so nothing is left half-written; what was finished stays). Our own warnings
    print as one line with the script's name.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if os.path.dirname(os.path.abspath(filename)) == here:
            print(f"{name}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        main(parse_args(argv))
    except (UserError, model.WeightsUnavailable) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted (finished outputs are kept; none is half-written)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show
    return 0


def mean_se(values: list[float]) -> dict:
    """Mean and standard error of the mean (what every reported number carries)."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return {"mean": mean, "se": se, "n": n}


def check_output(path: str, kind: str, flag: str = "--out"):
    """Before any model is loaded: can `path` (a "file" or a "folder") be written? Raises UserError.

    Missing parent folders are fine (they are created when the output is written); an output
    of the wrong kind, or a place that cannot be written even by root (a read-only file system,
    /proc), is not.
    """
    if kind == "file" and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give the path of a file")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give the path of a folder")
    probe = os.path.abspath(path if kind == "folder" else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made there")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e.__class__.__name__})") from None


def check_encoder_timestep(t: int, flag: str = "--encoder-timestep"):
    """--encoder-timestep (pretrain.py, tune.py), --t-min (pretrain.py): a DDPM timestep of the
    1,000-step schedule both presets' schedulers use (SD 1.5's and the toy's). Raises UserError."""
    if not 0 <= t < 1000:
        raise UserError(f"{flag} must be in [0, 1000), got {t}")


def resolve_device(name: str | None) -> torch.device:
    """--device: None -> cuda if available, else cpu; a CUDA device that is not there is a UserError."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device



def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    """Wait for queued GPU work, so that wall-clock timings are true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def atomic_write(path: str, write):
    """write(tmp) to a temp file beside `path` (same extension, so image writers keep their
    format), then rename over `path`: never a half-written file, and a failed write leaves
    neither the temp file nor a clobbered `path`."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def config_parser(cls, description: str, required=(), choices=None):
    """argparse from a script's @dataclass Config: one --flag per field, its default, and its
    trailing `# comment` as the help text (so the config block is the single documentation)."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    p = OneLineErrorParser(description=description, formatter_class=DefaultsHelpFormatter)
    types = {"int": int, "float": finite_float, "int | None": int, "float | None": finite_float}
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, " ").replace("%", "%%")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.name in required:  # no "(default: ...)" for a flag that must be given
            p.add_argument(flag, type=types.get(f.type, str), default=argparse.SUPPRESS, required=True,
                           choices=(choices or {}).get(f.name), help=text + " (required)")
        else:
            p.add_argument(flag, type=types.get(f.type, str), default=f.default, choices=(choices or {}).get(f.name),
                           help=text)
    return p


def finite_float(text: str) -> float:
    """argparse type: a float that is a number (no nan, no inf)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (the help text then says what happens instead)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError (one line, exit code 2 through run_cli), not usage + exit."""

    def error(self, message):
        raise UserError(message)
