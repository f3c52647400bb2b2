"""A fused model that has run saves, loads and deep-copies whole: its folded and prepacked
weights (derived from parameters and buffers; a prepacked oneDNN weight cannot be pickled) are
left out of the pickle and rebuilt on first use, so the copy computes what the original does,
and after more training the copy's caches follow its own weights."""

import copy
import io
import pickle

import pytest
import torch
import torchvision

import fused_resnet as fr

CL = torch.channels_last


def _fused(name: str, memory_format) -> torch.nn.Module:
    model = fr.fuse_(getattr(torchvision.models, name)(num_classes=10))
    return model.to(memory_format=memory_format)


def _input(memory_format):
    return torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"torch.save": _torch_save_load, "deepcopy": copy.deepcopy,
          "pickle": lambda m: pickle.loads(pickle.dumps(m))}


def _caches(model):
    """Every derived-weight cache of the fused modules (a dict per conv)."""
    found = []
    for module in model.modules():
        found += [module.__dict__.get("_fold_cache")] + \
            list(module.__dict__.get("_caches", {}).values())
    return [cache for cache in found if cache is not None]


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_copy_after_inference(name, memory_format, how):
    model = _fused(name, memory_format).eval()
    x = _input(memory_format)
    with torch.no_grad():
        expected = model(x)
    assert any(_caches(model)), "inference filled no cache: the test would show nothing"
    clone = COPIES[how](model)
    assert not any(_caches(clone)), "a derived cache was pickled"
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    assert clone.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_after_a_training_step_then_train_both(how):
    model = _fused("resnet18", CL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _input(CL), torch.randint(0, 10, (2,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        model(x)  # fills the caches from the stepped weights
    clone = COPIES[how](model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    # a step on the copy changes the copy's output, not the original's
    clone.train()
    clone_optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(clone(x), y).backward()
    clone_optimizer.step()
    clone.eval()
    with torch.no_grad():
        before, after = model(x), clone(x)
        reference = copy.deepcopy(fr.unfuse_(copy.deepcopy(clone))).eval()(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)
