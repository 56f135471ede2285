"""How much the driver thread pays to hand deltas to many handles, by the way callers wait.

    python -m benchmarks.handles_fanout

No engine: a thread plays the driver and pushes one delta per "step" into 256 handles (128 steps,
0.5 ms of engine time between steps), while the caller waits with nothing, ``result()``, or
``asyncio.gather(handle.aresult() ...)`` (what ``ChatVLLM.abatch`` does). The fan-out time per step
is driver time that the engine's next step waits for.
"""
import asyncio
import threading
import time

from vllm_magic.engine.requests.handles import RequestHandle

N, STEPS = 256, 128

def driver(handles, out):
    t = time.perf_counter()
    for step in range(STEPS):
        for h in handles:
            h.push(0, "x", [1], "length" if step == STEPS - 1 else None)
        if step == STEPS - 1:
            for h in handles:
                h.finish()
        time.sleep(0.0005)  # the engine's step: the driver waits on the engine core here
    out.append(time.perf_counter() - t - STEPS * 0.0005)

async def main_async():
    handles = [RequestHandle(f"r{i}", "p", [1], 1, lambda rid: None) for i in range(N)]
    out = []
    th = threading.Thread(target=driver, args=(handles, out))
    t = time.perf_counter(); th.start()
    await asyncio.gather(*(h.aresult() for h in handles))
    th.join()
    return out[0], time.perf_counter() - t

def main_sync():
    handles = [RequestHandle(f"r{i}", "p", [1], 1, lambda rid: None) for i in range(N)]
    out = []
    th = threading.Thread(target=driver, args=(handles, out))
    t = time.perf_counter(); th.start()
    [h.result() for h in handles]
    th.join()
    return out[0], time.perf_counter() - t

def main_none():
    handles = [RequestHandle(f"r{i}", "p", [1], 1, lambda rid: None) for i in range(N)]
    out = []
    driver(handles, out)
    return out[0], out[0]

if __name__ == "__main__":
    cases = [("no waiter", main_none), ("sync result()", main_sync),
             ("asyncio gather(aresult())", lambda: asyncio.run(main_async()))]
    for name, fn in cases:
        runs = [fn() for _ in range(5)]
        fanout = sorted(r[0] for r in runs)[2]
        total = sorted(r[1] for r in runs)[2]
        print(f"{name:28s} driver fan-out {fanout * 1e3 / STEPS:6.3f} ms/step  total {total * 1e3:7.1f} ms (median of 5)")
