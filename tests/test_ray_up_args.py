"""`k2serve up --ray` without a Ray cluster: flags to ClusterSpec and RayOptions, and the error when
the `ray` package is missing."""

from __future__ import annotations

import sys

import pytest

from k2serve.cli import build_parser
from k2serve.cluster.ray_plan import RayOptions
from k2serve.cluster.ray_runtime import RayCluster, RayUnavailableError, ray_up_from_args
from k2serve.cluster.up_args import options_from_args, spec_from_args

UP = ["up", "--model", "/models/k2", "--ray", "auto", "--prefill", "2", "--decode", "3", "--ep", "4"]


def test_spec_from_up_flags() -> None:
    args = build_parser().parse_args([*UP, "--kv-cache-mb", "64", "--no-prefix-caching", "--host", "0.0.0.0"])
    spec = spec_from_args(args)
    assert (spec.model_dir, spec.num_prefill, spec.num_decode, spec.ep_size) == ("/models/k2", 2, 3, 4)
    assert spec.host == "0.0.0.0" and spec.num_worker_processes == 20
    assert spec.engine_args[spec.engine_args.index("--kv-cache-mb") + 1] == "64"
    assert "--no-prefix-caching" in spec.engine_args


def test_worker_args_both_launchers_pass_to_an_ep_rank() -> None:
    args = build_parser().parse_args(
        [*UP, "--kv-cache-mb", "64", "--served-model-name", "k2", "--transfer-backend", "torch"]
    )
    spec = spec_from_args(args)
    argv = spec.worker_args("decode", "decode-1", "10.0.0.2", "10.0.0.1:50051", 3, "tcp://10.0.0.2:4000")
    assert argv == [
        *("decode", "--model", "/models/k2", "--dtype", "float32", "--host", "10.0.0.2", "--port", "0"),
        *("--router", "10.0.0.1:50051", "--worker-id", "decode-1", "--transfer-backend", "torch"),
        *spec.engine_args,
        *("--served-model-name", "k2", "--ep", "4", "--ep-rank", "3", "--ep-init", "tcp://10.0.0.2:4000"),
    ]
    parsed = build_parser().parse_args(argv)  # what the worker process will see
    assert (parsed.command, parsed.kv_cache_mb, parsed.ep, parsed.ep_rank) == ("decode", 64, 4, 3)
    with pytest.raises(ValueError, match="decode-1 of an EP group of 4 needs ep_init"):
        spec.worker_args("decode", "decode-1", "10.0.0.2", "10.0.0.1:50051", 3)


def test_options_default_without_ray_flags() -> None:
    opts = options_from_args(build_parser().parse_args(UP))
    assert opts == RayOptions()
    assert dict(opts.rank_resources) == {"CPU": 1.0}


def test_options_from_ray_flags_when_the_cli_has_them() -> None:
    args = build_parser().parse_args(UP)
    args.ray_cpus_per_rank, args.ray_gpus_per_rank = 8, 1
    args.ray_group_strategy, args.ray_max_restarts = "PACK", 0  # 0: never restart (not the default)
    opts = options_from_args(args)
    assert dict(opts.rank_resources) == {"CPU": 8.0, "GPU": 1.0}
    assert (opts.group_strategy, opts.max_restarts) == ("PACK", 0)


def test_without_the_ray_package_up_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailableError, match=r"pip install 'k2serve\[ray\]'"):
        RayCluster(spec_from_args(build_parser().parse_args(UP)), "auto").start()
    assert ray_up_from_args(build_parser().parse_args(UP)) == 2
    assert "k2serve[ray]" in capsys.readouterr().err
