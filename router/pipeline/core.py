"""The pipeline: one image request's life, whichever surface it came in by.

validation (`prepare`) → admission (rate limit, concurrency slot, credit hold) → routing →
delivery (normalization, artifacts) → settlement; or, for an async request, the same steps in a
task that owns the hold. Surfaces parse their dialect into an `ImageAsk`, call this, and render
what comes back; nothing here knows HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from imagegate.providers.base import InputImage

from ..artifacts import Artifact, ArtifactStore
from ..config import Config
from ..errors import ApiError, invalid
from ..fetch import Policy
from ..metrics import Metrics
from ..routing import ModelRouter, Served, Trail
from ..state import Store, TaskRecord
from .accounts import Accounts
from .admission import Admission
from .asks import ImageAsk, Inputs
from .caller import Caller
from .catalog import Catalog
from .delivery import Delivery, Gone
from .drain import Drain
from .idempotency import Idempotency, Reply
from .inputs import ImageRefs, check_image, resolve_input, resolve_inputs, white_mask
from .progress import Interrupted, JobBoard
from .results import Generation
from .selection import choose, precheck
from .settlement import Admitted, settle
from .task_runner import TaskRunner
from .task_views import TaskViews, delivery_view
from .validation import Prepared
from .webhooks import Webhooks


class Pipeline:
    def __init__(self, cfg: Config, metrics: Metrics, router: ModelRouter, store: Store,
                 artifacts: ArtifactStore) -> None:
        server = cfg.server
        self.cfg, self.router, self.store, self.artifacts = cfg, router, store, artifacts
        self.drain = Drain(server.shutdown_grace_s)
        self.admission = Admission(store, cfg.longest_run_s)
        self.delivery = Delivery(router, artifacts, self.drain, metrics, request_timeout_s=server.request_timeout_s,
                                 max_image_pixels=server.max_image_pixels)
        self.idempotency = Idempotency(store, server.request_timeout_s, cfg.state.idempotency_hours)
        self.tasks = TaskRunner(cfg, store, artifacts, self.delivery, self.drain, metrics)
        self.views = TaskViews(cfg, artifacts)
        self.webhooks = Webhooks(cfg, store, self.views, metrics)
        self.accounts = Accounts(store, router)
        self.catalog = Catalog(router)
        self.jobs = JobBoard()
        # URL inputs are fetched before routing: a refused one costs no upstream call and stores nothing.
        self.fetch = Policy.of(cfg.inputs) if cfg.inputs.url_fetch else None

    # -- validation

    def prepare(self, ask: ImageAsk, operation: str, inputs: Inputs, caller: Caller,
                resolved: Callable[[str], None] = lambda model_id: None) -> Prepared:
        """The request checked against its model (or the one `auto` picks) and priced, or a 4xx/503;
        nothing is held or called yet. `resolved` hears the model id as soon as it is known."""
        self.drain.check_accepting()
        return choose(self.router, self.cfg.auto, ask, operation, inputs, caller, resolved)

    def precheck(self, ask: ImageAsk, caller: Caller) -> None:
        """Before input images are read: the model, the key's right to it, and every field that does
        not depend on an input image. `prepare` checks it all again, with the inputs."""
        self.drain.check_accepting()
        precheck(self.router, ask, caller)

    async def resolve_inputs(self, refs: ImageRefs, caller: Caller) -> Inputs:
        """A body's image references resolved and checked: URLs fetched (SSRF-guarded), artifact ids
        read (the caller's own only)."""
        return await resolve_inputs(refs, self.artifacts, self.cfg.server.max_image_pixels, self.fetch, caller.owner)

    async def input_image(self, ref: object, param: str, caller: Caller) -> tuple[InputImage, str | None]:
        """One image reference (base64, data URI, artifact id, URL), checked, and the artifact it named."""
        return await resolve_input(ref, param, self.artifacts, self.cfg.server.max_image_pixels, self.fetch,
                                   caller.owner)

    async def check_image(self, data: bytes, param: str) -> InputImage:
        return await check_image(data, param, self.cfg.server.max_image_pixels)

    async def white_mask(self, data: bytes, param: str, size: tuple[int, int], invert: bool) -> InputImage:
        """An A1111-convention mask (white = edit) as the pipeline's (transparent = edit)."""
        return await white_mask(data, param, size, invert, self.cfg.server.max_image_pixels)

    def quote(self, prepared: Prepared) -> dict[str, Any]:
        """What a validated request would hold, without holding it: `dry_run`'s answer."""
        price = prepared.price
        return {"object": "image.quote", "dry_run": True, "model": prepared.model_id,
                "size": prepared.request.size, "n": prepared.request.n,
                "billing": {**price.body(), "held": float(price.cost)}}

    # -- running

    async def admit(self, prepared: Prepared, caller: Caller) -> Admitted:
        """Rate limit, concurrency slot and credit hold (429 or 402 here: nothing routed), for a
        request answered now (a task is admitted by `submit`)."""
        if prepared.webhook_url is not None:
            raise invalid("'webhook_url' is for async requests: send \"async\": true as well", "webhook_url",
                          code="webhook_needs_async")
        return await self.admission.admit(prepared, caller)

    async def generate(self, prepared: Prepared, caller: Caller, gone: Gone | None = None) -> Generation:
        """A synchronous request from admission to settlement. `gone`: waits for the client to leave
        (then the work is cancelled and `ClientGone` raised). While it runs it is on the job board:
        its progress can be read, and the caller can interrupt it (then `Interrupted`)."""
        admitted = await self.admit(prepared, caller)
        with self.jobs.track(caller, prepared.model_id, prepared.request) as job, job.scope:
            return await self.run(prepared, caller, admitted, gone)
        raise Interrupted()  # only an interrupt cancels the job's scope; the hold was settled (shielded)

    async def run(self, prepared: Prepared, caller: Caller, admitted: Admitted, gone: Gone | None = None) -> Generation:
        """Route, deliver and settle an admitted request: the hold captures what was delivered."""
        delivered_micros = 0
        try:
            inputs = await self.delivery.keep_inputs(prepared.inputs, caller.owner)  # before the model runs
            served = await self.delivery.route(prepared, Trail(), gone)
            try:
                generation = await self._hand_over(prepared, caller, admitted, served, inputs)
            except ApiError as exc:
                exc.headers["x-should-retry"] = "false"  # the upstream did the (paid) work; repeating pays again
                raise
            delivered_micros = generation.delivered.price.cost_micros
            return generation
        finally:
            await settle(self.store, admitted, delivered_micros)

    async def _hand_over(self, prepared: Prepared, caller: Caller, admitted: Admitted, served: Served,
                         inputs: list[str]) -> Generation:
        delivered = await self.delivery.deliver(prepared, served)
        if prepared.artifacts and not prepared.stream:  # its owner can feed them back; streams carry base64
            await self.delivery.store(delivered.images, caller.owner, prepared.keep_s)
        billing = delivered.price.body()
        if admitted.hold is not None:
            billing.update(admitted.hold.body(delivered.price.cost_micros))
        return Generation(prepared, served.route.provider.name, delivered, billing, served.result.metadata, inputs,
                          fallback=served.route.index > 0)

    async def release(self, admitted: Admitted) -> None:
        """Give back what an admitted request holds (nothing was delivered, or it was settled already)."""
        await settle(self.store, admitted, 0)

    async def submit(self, prepared: Prepared, caller: Caller) -> TaskRecord:
        """Admit and start an async task; the task owns the hold and the slot from then on. Its
        webhook URL is checked first: a refused one costs nothing."""
        webhook = None if prepared.webhook_url is None else await self.webhooks.check(prepared.webhook_url, caller)
        admitted = await self.admission.admit(prepared, caller)
        try:
            return await self.tasks.submit(prepared, caller, admitted, webhook)
        except BaseException:
            await self.release(admitted)
            raise

    async def idempotent(self, caller: Caller, key: str | None, print_: Callable[[], str],
                         handle: Callable[[], Awaitable[Reply]]) -> Reply:
        """`handle` once per (caller, Idempotency-Key); see idempotency.py."""
        return await self.idempotency.once(caller, key, print_, handle)

    # -- artifacts

    async def upload(self, data: bytes, image: InputImage, caller: Caller) -> Artifact:
        """Keep a checked input image as the caller's artifact (counted against its rate limit)."""
        await self.admission.check_rate(caller)
        return await self.artifacts.put(data, content_type=image.content_type, width=image.width,
                                        height=image.height, owner=caller.owner)

    async def artifact(self, artifact_id: str, caller: Caller, expires: str | None = None,
                       signature: str | None = None) -> tuple[Artifact, bytes]:
        """An artifact's bytes, for its owner's key or for anyone holding a valid signed URL."""
        owner: str | None = None  # a valid signature is the credential: any owner's artifact
        if expires is not None and signature is not None:
            if not self.artifacts.check_signature(artifact_id, expires, signature):
                raise ApiError(403, "the artifact URL is invalid or has expired", code="invalid_signature")
        else:
            owner = caller.owner
            if owner is None and self.cfg.auth.enabled:  # never "any owner" without a key or a valid signature
                raise ApiError(401, "no API key: send `Authorization: Bearer <key>` or use a signed URL",
                               code="invalid_api_key", headers={"www-authenticate": "Bearer"})
        found = await self.artifacts.get(artifact_id, owner)
        if found is None:
            raise ApiError(404, f"artifact '{artifact_id}' not found", code="artifact_not_found")
        return found

    async def task_view(self, caller: Caller, task: TaskRecord, *, with_images: bool = True) -> dict[str, Any]:
        """The task object as its owner sees it: images (for b64_json), links, webhook delivery."""
        images = await self.tasks.images_of(task) if with_images else None
        found = await self.store.webhook_of_task(task.id)
        webhook = None if found is None else delivery_view(found[0], found[2])
        return self.views.render(task, caller.base_url, images, webhook=webhook)

    def url_of(self, caller: Caller, artifact: Artifact) -> str:
        """A signed, expiring URL of an artifact: the gateway's, at the address the caller reaches it
        by, or the bucket's presigned one."""
        return self.artifacts.url(artifact, caller.base_url)

    def url_for(self, caller: Caller, artifact_id: str, expires: int) -> str:
        return self.artifacts.url_for(artifact_id, expires, caller.base_url)
