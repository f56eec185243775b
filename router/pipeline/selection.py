"""Which model serves a request: the one it names (by id or alias), or for `"auto"` the best of
`auto.candidates` that can serve this very request now, in the configured policy's order."""

from __future__ import annotations

from collections.abc import Callable

from ..config import AutoConfig
from ..errors import ApiError
from ..routing import ModelRoute, ModelRouter
from . import validation
from .asks import ImageAsk, Inputs
from .caller import Caller
from .validation import Prepared, prepare


def choose(router: ModelRouter, auto: AutoConfig, ask: ImageAsk, operation: str, inputs: Inputs,
           caller: Caller, resolved: Callable[[str], None]) -> Prepared:
    """The validated request for the model it names; `resolved` hears the model id as soon as it
    is known (requests are counted by model, refusals included)."""
    if ask.model == "auto":
        prepared = pick_auto(router, auto, ask, operation, inputs, caller)
        resolved(prepared.model_id)
        return prepared
    model_id = router.resolve(ask.model)
    resolved(model_id)
    caller.check_model(model_id)  # after resolving: a key's list names models, not their aliases
    prepared = prepare(ask, model_id, router.model(model_id), operation, inputs)
    router.check_capable(model_id, prepared.needs)
    return prepared


def precheck(router: ModelRouter, ask: ImageAsk, caller: Caller) -> None:
    """The checks that need no input image, for the model the request names (`auto` picks later,
    knowing the inputs)."""
    if ask.model == "auto":
        return
    model_id = router.resolve(ask.model)
    caller.check_model(model_id)
    validation.precheck(ask, model_id, router.model(model_id))


def pick_auto(router: ModelRouter, auto: AutoConfig, ask: ImageAsk, operation: str, inputs: Inputs,
              caller: Caller) -> Prepared:
    """The candidates that can serve this very request now, ordered by policy. A key never gets a
    model outside its list."""
    fits: list[tuple[Prepared, ModelRoute]] = []
    permitted = [m for m in map(router.resolve, auto.candidates) if caller.may_use(m)]
    if auto.candidates and not permitted:
        raise ApiError(403, "this API key may use none of the models that 'auto' picks from",
                       param="model", code="model_not_allowed")
    for model_id in permitted:
        try:
            prepared = prepare(ask, model_id, router.model(model_id), operation, inputs)
            router.check_capable(model_id, prepared.needs)
        except ApiError:
            continue
        routes = router.available(model_id, prepared.request, prepared.needs)
        if routes:
            fits.append((prepared, routes[0]))
    if not fits:
        raise ApiError(400, "no model in auto.candidates can serve this request now", param="model",
                       code="no_candidate_model")
    # Stable sorts: ties keep the candidates' configured order.
    if auto.policy == "cheapest":
        fits.sort(key=lambda fit: fit[0].price.cost_micros)
    elif auto.policy == "fastest":
        # A route never measured sorts first, so every candidate gets measured.
        fits.sort(key=lambda fit: fit[1].latency.mean or 0.0)
    elif auto.policy == "least_busy":
        fits.sort(key=lambda fit: router.health[fit[1].provider.name].limiter.load)
    return fits[0][0]
