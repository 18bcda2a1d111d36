"""The online width controller's place in the engine: step times measured around the model
runner's step, and the engine's one controller.

:class:`vllm_d2moe.router.controller.WidthController` steers the router's
global shift from how long steps take. A step here is the model runner's
``execute_model`` (the forward pass, every layer's width decision in it)
through its ``sample_tokens``, wrapped in ``vllm_glue/patches.py``. What a
decoding request waits per token is also the engine loop between steps
(scheduling, outputs), so while steps run back to back (the gap since the last
one shorter than the step itself) a step counts from the end of the one before;
after an idle pause it counts from its own start.

One controller per process: the quantization config makes it with the first
MoE layer's width decision (:meth:`D2MoEConfig.width_selector`) and sets it
here; an engine started later in the same process replaces it.
"""

import time

from vllm_d2moe.router.controller import WidthController

_state = {"controller": None, "started": None, "finished": None}


def set_controller(controller: WidthController | None) -> None:
    _state.update(controller=controller, started=None, finished=None)


def active_controller() -> WidthController | None:
    return _state["controller"]


def step_started() -> None:
    if _state["controller"] is not None:
        _state["started"] = time.monotonic()


def step_finished() -> None:
    controller, started, finished = _state["controller"], _state["started"], _state["finished"]
    if controller is None or started is None:
        return
    now = time.monotonic()
    back_to_back = finished is not None and started - finished < now - started
    controller.step_finished(now - (finished if back_to_back else started), now)
    _state.update(started=None, finished=now)
