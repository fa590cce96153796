"""(a) The Python client's ceiling: a raw aiokafka consume -> orjson parse + small transform -> produce loop.

At-least-once like the others: offsets are committed every ``--commit-interval`` seconds after every
output sent so far was acknowledged. Run as ``python -m bench.raw_loop --bootstrap ... --group ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def run(bootstrap: str, group: str, inputs: list[str], output: str, commit_interval: float, linger: int) -> None:
    consumer = AIOKafkaConsumer(
        *inputs,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1 << 20,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=linger, max_batch_size=256 << 10)
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pending: list[asyncio.Future] = []
    last_commit = time.monotonic()
    dirty = False
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for msgs in batch.values():
                for m in msgs:
                    ev = orjson.loads(m.value)
                    ev["seen"] = 1
                    ev["kind"] = ev["type"][0]
                    pending.append(await producer.send(output, orjson.dumps(ev), key=m.key))
                dirty = True
            if (dirty and time.monotonic() - last_commit >= commit_interval) or (dirty and not batch):
                await asyncio.gather(*pending)
                pending.clear()
                await consumer.commit()
                last_commit, dirty = time.monotonic(), False
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--inputs", required=True, help="comma-separated input topics")
    p.add_argument("--output", required=True)
    p.add_argument("--commit-interval", type=float, default=1.0)
    p.add_argument("--linger-ms", type=int, default=5)
    a = p.parse_args()
    asyncio.run(run(a.bootstrap, a.group, a.inputs.split(","), a.output, a.commit_interval, a.linger_ms))


if __name__ == "__main__":
    main()
