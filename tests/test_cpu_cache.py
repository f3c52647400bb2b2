"""The C++ CPU kernels' cache of large output blocks (csrc/cpu/output_pool.h,
fused_resnet.cpu_cache): blocks come back to the next step, results stay exact, the limit and
the off switch hold, release() frees, a cached tensor behaves like any other."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import fused_resnet as fr
from fused_resnet import _extension, reference

ops = torch.ops.fused_resnet

pytestmark = pytest.mark.skipif(not _extension.available(),
                                reason=f"no _C: {_extension.error()}")

# 2 x 64 x 32 x 32 fp32 = 512 KiB: above the cache's 256 KiB floor
SHAPE = (2, 64, 32, 32)


def apply_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    return x, scale, shift


def apply(x, scale, shift):
    return ops.bn_add_relu_apply_cpp(x, None, scale, shift, True, True)


def test_a_freed_output_block_serves_the_next_call():
    fr.cpu_cache.release()
    first = apply(*apply_inputs(0))[0]
    pointer = first.data_ptr()
    before = fr.cpu_cache.stats()
    del first
    assert fr.cpu_cache.stats()["cached_bytes"] >= before["cached_bytes"] + 512 * 1024
    x, scale, shift = apply_inputs(1)
    out, _ = apply(x, scale, shift)
    after = fr.cpu_cache.stats()
    assert out.data_ptr() == pointer
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    # the reused block holds the new result, not the old one (fp32 reference: the kernel
    # rounds x*scale + shift once, with a fused multiply-add, the reference twice)
    want, _ = reference.bn_add_relu_apply(x, None, scale, shift, True, True)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_small_outputs_do_not_use_the_cache():
    before = fr.cpu_cache.stats()
    x = torch.randn(2, 16, 8, 8)
    out, _ = ops.bn_add_relu_apply_cpp(x, None, torch.ones(16), torch.zeros(16), True, True)
    del out
    after = fr.cpu_cache.stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_release_frees_unused_blocks_and_keeps_live_ones():
    live = apply(*apply_inputs())[0]
    dead = apply(*apply_inputs())[0]
    del dead
    assert fr.cpu_cache.stats()["cached_bytes"] > 0
    fr.cpu_cache.release()
    stats = fr.cpu_cache.stats()
    assert stats["cached_bytes"] == 0 and stats["in_use_bytes"] >= live.numel() * 4
    in_use = stats["in_use_bytes"]
    del live
    assert fr.cpu_cache.stats()["in_use_bytes"] <= in_use - SHAPE[0] * 64 * 32 * 32 * 4


def test_a_cached_tensor_resizes_and_copies_like_any_other():
    out = apply(*apply_inputs())[0]
    saved = out.clone()
    flat = out.view(-1) if out.is_contiguous() else out.permute(0, 2, 3, 1).reshape(-1)
    flat = flat.clone()
    storage = out.untyped_storage()
    storage.resize_(storage.nbytes() * 2)  # through the cache's allocator: contents kept
    assert torch.equal(out, saved)
    assert torch.equal(out.permute(0, 2, 3, 1).reshape(-1), flat)


def test_training_steps_reuse_blocks_and_match_the_uncached_model_bitwise(tmp_path):
    """Two fused ResNet-18 training steps: the second takes no new blocks; outputs and every
    gradient bitwise those of the same model in a process with the cache off."""
    script = tmp_path / "steps.py"
    script.write_text(
        "import sys, torch, torchvision, fused_resnet as fr\n"
        "torch.manual_seed(0)\n"
        "m = fr.fuse_(torchvision.models.resnet18(num_classes=10)).train()\n"
        "m = m.to(memory_format=torch.channels_last)\n"
        "x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)\n"
        "misses = []\n"
        "for _ in range(2):\n"
        "    m.zero_grad(set_to_none=True)\n"
        "    out = m(x); out.sum().backward(); misses.append(fr.cpu_cache.stats()['misses'])\n"
        "torch.save({'out': out, 'misses': misses, 'stats': fr.cpu_cache.stats(),\n"
        "            'grads': {n: p.grad for n, p in m.named_parameters()}}, sys.argv[1])\n")
    results = {}
    for limit in ("0", "1024"):
        path = tmp_path / f"{limit}.pt"
        env = dict(os.environ, FUSED_RESNET_CPU_CACHE_MB=limit)
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True,
                       cwd=tmp_path)
        results[limit] = torch.load(path)
    off, on = results["0"], results["1024"]
    assert off["stats"]["limit_bytes"] == 0 and off["stats"]["hits"] == 0
    assert on["stats"]["limit_bytes"] == 1024 << 20
    assert on["misses"][0] > 0 and on["misses"][1] == on["misses"][0]  # step 2: all reused
    assert on["stats"]["hits"] > 0
    assert torch.equal(on["out"], off["out"])
    for name, grad in off["grads"].items():
        assert torch.equal(on["grads"][name], grad), name


def test_the_limit_bounds_the_unused_blocks(tmp_path):
    code = ("import torch, fused_resnet as fr\n"
            "ops = torch.ops.fused_resnet\n"
            "x = torch.randn(2, 64, 32, 32)\n"
            "outs = [ops.bn_add_relu_apply_cpp(x, None, torch.ones(64), torch.zeros(64), True,"
            " False)[0] for _ in range(5)]\n"
            "del outs\n"
            "s = fr.cpu_cache.stats()\n"
            "assert s['limit_bytes'] == 1 << 20, s\n"
            "assert 0 < s['cached_bytes'] <= s['limit_bytes'], s\n"
            "assert s['in_use_bytes'] == 0, s\n")
    env = dict(os.environ, FUSED_RESNET_CPU_CACHE_MB="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path)


def test_a_bad_limit_is_a_clear_error(tmp_path):
    code = ("import torch, fused_resnet as fr\n"
            "x = torch.randn(2, 64, 32, 32)\n"
            "torch.ops.fused_resnet.bn_add_relu_apply_cpp(x, None, torch.ones(64),"
            " torch.zeros(64), True, False)\n")
    env = dict(os.environ, FUSED_RESNET_CPU_CACHE_MB="lots")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "FUSED_RESNET_CPU_CACHE_MB must be a whole number of MiB" in run.stderr
    assert "'lots'" in run.stderr


def test_threads_allocating_at_once_leave_the_cache_consistent():
    fr.cpu_cache.release()
    base = fr.cpu_cache.stats()["in_use_bytes"]
    x, scale, shift = apply_inputs()
    want = apply(x, scale, shift)[0]
    errors = []

    def work():
        for _ in range(20):
            if not torch.equal(apply(x, scale, shift)[0], want):
                errors.append("wrong result")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    del want
    assert fr.cpu_cache.stats()["in_use_bytes"] == base
