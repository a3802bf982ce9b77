"""Loaded at interpreter start-up when this folder is on PYTHONPATH (tests/train/test_distributed.py): with
DISTIL_TEST_KILL="RANK:KIND:N", the process of that rank SIGKILLs itself just before its N-th event of KIND:
`step` (an optimizer step) or `save` (a tensor file of a checkpoint being written). Other processes are untouched."""

import os

_plan = os.environ.get("DISTIL_TEST_KILL", "")
if _plan and os.environ.get("RANK") == _plan.split(":")[0]:
    import signal

    _, _kind, _n = _plan.split(":")
    _count = [0]

    def _event() -> None:
        _count[0] += 1
        if _count[0] == int(_n):
            os.kill(os.getpid(), signal.SIGKILL)

    if _kind == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        # After the step: the optimizer moved, the checkpoint of this step was not written.
        register_optimizer_step_post_hook(lambda *args: _event())
    else:
        from distil.train import checkpoint as _ckpt

        _save = _ckpt.save_tensors

        def _save_and_die(path, *args, **kwargs):
            if ".tmp-" in str(path):  # a checkpoint being written, not a model folder
                _event()
            return _save(path, *args, **kwargs)

        _ckpt.save_tensors = _save_and_die
