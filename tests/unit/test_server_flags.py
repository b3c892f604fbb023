"""`balpm-server` has a flag for every setting (the README promises it), with its env var in the help."""

from __future__ import annotations

import dataclasses

from balpm_server.server import build_arg_parser
from balpm_server.settings import Settings


def test_every_setting_is_a_flag_with_its_env_var_in_the_help() -> None:
    parser = build_arg_parser()
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(Settings):
        if f.name.startswith("_"):
            continue
        assert f.name in dests, f"no flag for setting {f.name}"
        assert f"BALPM_{f.name.upper()}" in (dests[f.name].help or ""), f.name


def test_setting_flags_reach_the_settings() -> None:
    args = build_arg_parser().parse_args(
        ["--triton-model", "my_model", "--pooling", "last_token", "--device", "cpu", "--no-log-json",
         "--triton-timeout-s", "2.5", "--extract-batch-size", "16"]
    )
    s = Settings.from_env(environ={}, **{k: v for k, v in vars(args).items() if v is not None})
    assert (s.triton_model, s.pooling, s.device, s.log_json) == ("my_model", "last_token", "cpu", False)
    assert (s.triton_timeout_s, s.extract_batch_size) == (2.5, 16)
    untouched = Settings.from_env(environ={}, **{k: v for k, v in vars(build_arg_parser().parse_args([])).items()
                                                  if v is not None})
    assert untouched == Settings.from_env(environ={})  # flags not given change nothing
