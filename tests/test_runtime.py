"""router/runtime.py: a serving process's collector, tuned once its app has started.

Each case runs in a fresh interpreter, so this test process keeps its own collector settings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from imagegate.router import runtime

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_app_freezes_what_start_up_made_once_its_services_are_open(tmp_path: Path) -> None:
    """The lifespan calls `on_started` after the services opened: the store's engine is frozen
    with the rest, and the youngest generation is collected less often."""
    cfg = {"artifacts": {"dir": str(tmp_path / "artifacts")}, "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
           "providers": {"demo": {"type": "demo"}},
           "models": {"demo": {"routes": [{"provider": "demo", "model": "demo"}]}}}
    (tmp_path / "gateway.yaml").write_text(json.dumps(cfg))
    found = _run(f"""
        import asyncio, gc, json
        from imagegate.router import runtime
        from imagegate.router.app import create_app
        from imagegate.router.config import load

        app = create_app(load("{tmp_path / 'gateway.yaml'}"), on_started=runtime.freeze_startup_objects)
        before = gc.get_freeze_count()

        async def main():
            async with app.router.lifespan_context(app):
                engine = app.state.gateway.store.runner.engine
                frozen = gc.get_freeze_count()
                young = gc.get_threshold()[0]
                hidden = not any(obj is engine for obj in gc.get_objects())  # no generation holds it
                gc.unfreeze()  # the frozen objects go back to the oldest generation
                return frozen, young, hidden and any(obj is engine for obj in gc.get_objects(generation=2))

        frozen, young, seen = asyncio.run(main())
        print(json.dumps({{"before": before, "frozen": frozen, "young": young, "engine_frozen": seen}}))
    """)
    assert found["before"] == 0 and found["frozen"] > found["before"]
    assert found["young"] == runtime.YOUNG_THRESHOLD
    assert found["engine_frozen"]


def test_garbage_left_by_start_up_is_collected_not_frozen() -> None:
    found = _run("""
        import gc, json, weakref
        from imagegate.router import runtime

        gc.disable()  # from here nothing collects automatically: only freeze_startup_objects can

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None
        runtime.freeze_startup_objects()
        print(json.dumps({"collected": gone() is None, "frozen": gc.get_freeze_count()}))
    """)
    assert found["collected"] and found["frozen"] > 0
