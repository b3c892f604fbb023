"""Drive a running balpm-server with the AsyncClient of a client-only install (run by client_smoke.sh).

Usage: python client_smoke.py HOST:PORT
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys

from balpm.aio import AsyncClient


async def main(target: str) -> None:
    for heavy in ("balpm_server", "numpy", "torch"):
        assert importlib.util.find_spec(heavy) is None, f"{heavy} is importable in the client-only venv"
    async with AsyncClient(target, timeout_s=120) as c:
        await c.wait_ready(60)
        pool = await c.get_pool("smoke")  # created and filled by the CLI
        assert pool.item_count == 30, pool
        batch = await c.acquire("smoke", batch_size=8, strategy="ENTROPY_ONLY", annotator_id="async")
        ids = [a.item.item_id for a in batch.items]
        assert len(set(ids)) == 8
        labels = [{"label_id": f"async-{i}", "item_id": iid, "preference": "AB"[k % 2], "annotator_id": "async"}
                  for k, (i, iid) in enumerate(enumerate(ids))]
        stored = await c.ingest_labels("smoke", labels)
        assert stored.stored_count == 8, stored
        op = await c.update_posterior("smoke", epochs=3)
        assert op.done and op.result.posterior_version >= 1, op
        preds = await c.predict("smoke", item_ids=ids[:3])
        assert len(preds.predictions) == 3
        again = await c.acquire("smoke", batch_size=4, strategy="BALPM", annotator_id="async")
        assert not set(a.item.item_id for a in again.items) & set(ids)
    print("async client smoke: ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
