"""Config: YAML in, validated dataclasses, flat dict out; errors before Ray starts."""

import subprocess
import sys

import pytest

from raydir.config import Config


def test_defaults_validate_and_flatten_round_trip():
    cfg = Config.from_dict({})
    flat = cfg.to_flat_dict()
    assert flat["fds.ks"] == 5 and flat["train.num_workers"] == 2
    assert flat["data.synthetic.n_train"] == cfg.data.synthetic.n_train
    again = cfg.with_overrides({"fds.ks": 7, "reweight.scheme": "inverse"})
    assert again.fds.ks == 7 and again.reweight.scheme == "inverse" and cfg.fds.ks == 5
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fds:\n  enabled: true\ntrain:\n  epochs: 3\n")
    cfg = Config.from_yaml(path, ["fds.ks=9", "reweight.scheme=sqrt_inv", "reweight.lds=true",
                                  "model.hidden=[32, 16]"])
    assert cfg.fds.enabled and cfg.fds.ks == 9 and cfg.train.epochs == 3
    assert cfg.reweight.lds and cfg.model.hidden == [32, 16]


@pytest.mark.parametrize("raw, fragment", [
    ({"fds": {"kss": 3}}, "unknown config key 'fds.kss'. Did you mean 'fds.ks'?"),
    ({"nope": {}}, "unknown config key 'nope'"),
    ({"fds": {"ks": 4}}, "'fds.ks' should be a positive odd integer (the window must have a centre); got 4"),
    ({"reweight": {"sigma": 0}}, "'reweight.sigma' should be a positive number"),
    ({"reweight": {"lds": True}}, "Set reweight.scheme to inverse or sqrt_inv"),
    ({"loss": {"name": "l3"}}, "'loss.name' should be one of"),
    ({"train": {"epochs": 1.5}}, "'train.epochs' should be an integer"),
    ({"train": {"allreduce": "nccl"}}, "'train.allreduce' should be one of"),
    ({"fds": {"enabled": "yes"}}, "'fds.enabled' should be true or false"),
    ({"fds": {"momentum": 1.0}}, "'fds.momentum' should be in [0, 1)"),
    ({"data": {"source": "sts-b-dir"}}, "'data.path' is required"),
    ({"data": {"synthetic": {"carve": [[10, 5]]}}}, "'data.synthetic.carve[0]'"),
])
def test_bad_config_names_the_key(raw, fragment):
    with pytest.raises(ValueError) as err:
        Config.from_dict(raw)
    assert fragment in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"Valid keys in 'train': \[.*'batch_size'.*\]"):
        Config.from_dict({"train": {"batchsize": 3}})


def test_cli_config_error_exits_before_ray(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    code = ("import sys; from raydir.cli import main; "
            f"rc = main(['train', '--config', {str(path)!r}]); "
            "print(rc, 'ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "False", "False"]
    assert "unknown config key 'train.epoch'" in out.stderr


def test_kernel_names_come_from_kernels_module():
    """The config accepts exactly the kernels that ``kernel_window`` knows, and says which."""
    from raydir.kernels import KERNELS, kernel_window

    for kind in KERNELS:
        cfg = Config.from_dict({"reweight": {"scheme": "inverse", "lds": True, "kernel": kind},
                                "fds": {"kernel": kind}})
        assert kernel_window(cfg.fds.kernel, cfg.fds.ks, cfg.fds.sigma).shape == (cfg.fds.ks,)
    with pytest.raises(ValueError) as err:
        Config.from_dict({"fds": {"kernel": "cosine"}})
    assert f"'fds.kernel' should be one of {sorted(KERNELS)}; got 'cosine'" in str(err.value)


def test_choice_and_positive_messages_come_from_checks():
    from raydir import _checks

    for raw, call in (({"train": {"optimizer": "lion"}},
                       lambda: _checks.check_choice("train.optimizer", "lion", ("adam", "sgd"))),
                      ({"train": {"lr": -0.1}}, lambda: _checks.check_positive("train.lr", -0.1))):
        with pytest.raises(ValueError) as ours:
            Config.from_dict(raw)
        with pytest.raises(ValueError) as theirs:
            call()
        assert str(ours.value) == str(theirs.value)
