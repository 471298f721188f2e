"""Saving and loading Hugging Face folders, and every way a checkpoint can be wrong."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sambay

from conftest import GOLDEN  # noqa: E402 - the shared path


@pytest.fixture(scope="module")
def golden_model():
    return sambay.load_model(GOLDEN)


@pytest.fixture
def folder(tmp_path):
    """A writable copy of the golden checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDEN, dst, ignore=shutil.ignore_patterns("golden*", "quirk*", "stats.json"))
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


IDS = torch.randint(0, 511, (2, 17), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_save_load_identical_logits_and_reference_format(golden_model, tmp_path):
    out = sambay.save_model(golden_model, tmp_path / "saved")
    again = sambay.load_model(out)
    assert torch.equal(again(IDS), golden_model(IDS))
    # Same tensor names, shapes and dtypes as the reference's own file, so the reference loads it.
    ref, ours = load_file(GOLDEN / "model.safetensors"), load_file(out / "model.safetensors")
    assert ref.keys() == ours.keys()
    assert all(ref[k].shape == ours[k].shape and ref[k].dtype == ours[k].dtype for k in ref)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Phi4FlashForCausalLM"] and cfg["model_type"] == "phi4flash"
    assert "differential_attention" not in cfg  # the reference's own keys only
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@torch.no_grad()
def test_sharded_save_and_load(golden_model, tmp_path):
    out = sambay.save_model(golden_model, tmp_path / "sharded", max_shard_bytes=300_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert torch.equal(sambay.load_model(out)(IDS), golden_model(IDS))
    # Saving again unsharded removes the stale shards.
    sambay.save_model(golden_model, out)
    assert not list(out.glob("model-*-of-*.safetensors")) and (out / "model.safetensors").exists()


@torch.no_grad()
def test_bf16_save_keeps_fp32_params_and_loads_in_any_dtype(golden_model, tmp_path):
    out = sambay.save_model(golden_model, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.attn.A_log"].dtype == torch.float32
    assert tensors["model.layers.1.attn.inner_cross_attn.lambda_q1"].dtype == torch.float32
    assert tensors["model.layers.0.attn.in_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sambay.load_model(out).dtype == torch.bfloat16  # the checkpoint's dtype by default
    m32 = sambay.load_model(out, dtype=torch.float32)
    assert m32.dtype == torch.float32
    assert (m32(IDS) - golden_model(IDS)).norm() / golden_model(IDS).norm() < 0.05


def test_tied_head_shares_the_embedding(golden_model):
    assert golden_model.lm_head is None
    assert "lm_head.weight" not in golden_model.state_dict()


def test_random_full_size_model_is_quick_and_exact_in_shape():
    """The real shapes in bf16 straight from the meta device (no 15 GB float32 detour)."""
    code = ("import torch, time, resource, sambay; t=time.time(); "
            "m = sambay.load_model('phi4-mini-flash', dtype=torch.bfloat16); "
            "n = sum(p.numel() for p in m.parameters()); "
            "print(n, time.time()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, seconds, peak = out.stdout.split()
    assert int(n) == 3_852_562_944
    assert int(peak) < 10 * 2**30, f"peak RSS {int(peak) / 2**30:.1f} GiB: built via float32?"


# ---- errors: each one line, naming what is wrong -------------------------------------------------


def error_of(path, **kw):
    with pytest.raises(sambay.SambayError) as e:
        sambay.load_model(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    assert "no model folder" in error_of(tmp_path / "nope")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    assert "config.json" in error_of(folder)


def test_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    assert "no weights" in error_of(folder)


def test_pickle_weights_are_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    assert "safetensors only" in error_of(folder)


def test_unknown_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "llama" in error_of(folder)


def test_config_breaking_layout_rules(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "multiple of 4" in error_of(folder)


def test_invalid_json(folder):
    (folder / "config.json").write_text("{not json")
    assert "not valid JSON" in error_of(folder)


def test_missing_and_unexpected_tensors_are_named(folder):
    t = load_file(folder / "model.safetensors")
    t["model.layers.9.attn.extra"] = torch.zeros(1)
    del t["model.layers.3.attn.Wqkv.bias"]
    save_file(t, folder / "model.safetensors")
    msg = error_of(folder)
    assert "missing 1 tensor(s): model.layers.3.attn.Wqkv.bias" in msg
    assert "unexpected 1 tensor(s): model.layers.9.attn.extra" in msg


def test_misshaped_tensor_is_named(folder):
    t = load_file(folder / "model.safetensors")
    t["model.layers.2.mlp.fc1.weight"] = torch.zeros(10, 64)
    save_file(t, folder / "model.safetensors")
    msg = error_of(folder)
    assert "model.layers.2.mlp.fc1.weight" in msg and "[10, 64]" in msg and "[512, 64]" in msg


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in error_of(folder)


def test_corrupt_header(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "truncated or corrupt" in error_of(folder)


def test_missing_shard_is_named(golden_model, tmp_path):
    out = sambay.save_model(golden_model, tmp_path / "sharded", max_shard_bytes=300_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in error_of(out)


def test_cli_info_on_folder_and_preset(capsys):
    from sambay.cli import main

    assert main(["info", "--preset", "phi4-mini-flash", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 3_852_562_944
    assert info["layout"] == "MSMSMSMSMSMSMSMSMA|GXGXGXGXGXGXGX"
    assert info["state_bytes_per_token"] == 5120
    assert main(["info", "--model", str(GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert "588,608" in out and "MSMSMA|GX" in out and "kernels" not in out
    assert main(["info", "--model", str(GOLDEN), "--kernels"]) == 0
    from sambay.kernels import native as kernels
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("kernels"))
    assert kernels.native_status() in line and all(p in line for p in kernels.fast_paths())
    assert f"on {torch.get_num_threads()} thread(s)" in line
    assert main(["info", "--model", "/no/such/dir"]) == 2
    assert "no model folder" in capsys.readouterr().err
