#!/usr/bin/env python3
"""Protocol model of the warp-specialised prefill kernels (prefill_wgmma.cu,
`prefill_wgmma_ws_impl`), no GPU needed: the producer and the two consumer warpgroups as
coroutines over modelled mbarriers (phases, arrival counts, parity waits) and named
barriers (bar.sync / bar.arrive of 256 threads), stepping in every interleaving a
randomised scheduler picks. For each CTA shape (new tokens, cached tokens, the CTA's row
tile) it checks that the pipeline finishes (no deadlock), that every tile a warpgroup
computes was full and not yet refilled while it read it, and that the phases balance.
It mirrors the loops of the source by hand: keep them in step.

The TMA design (`tma`) has its own producer: one thread arrives on a stage's `full` with
the tile's byte count (expect_tx) and issues the copies, which land later, in order, in
an asynchronous copy engine (modelled as a fourth coroutine that completes the phase);
the stage is being overwritten from the issue on; at the end the thread waits for the
last tiles' phases, so the CTA never retires with copies in flight.

It also runs the two-stage ring with 128-key tiles that `ws_stages` rules out, and must
find that one deadlocks (so the model can fail).

  python3 kernels/tools/pipeline_model.py
"""
import random
import sys


class Deadlock(Exception):
    pass


BLOCKED = "blocked"  # what a coroutine yields while it waits (anything else: progress)


class MBar:
    """An mbarrier: `count` arrivals complete a phase; `phase` counts completed phases."""

    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):
        # try_wait.parity: true once the phase with this parity has completed, i.e. the
        # current (incomplete) phase's parity differs.
        return (self.phase & 1) != parity


class NamedBar:
    """bar.sync / bar.arrive of 256 threads, two warpgroups of 128."""

    def __init__(self):
        self.count, self.generation = 0, 0

    def add(self):
        self.count += 128
        if self.count == 256:
            self.count = 0
            self.generation += 1


def run_cta(n_new, cached, tile_row0, bc, st, pingpong, rng, tma=False):
    """Simulates one CTA; returns the number of steps. Raises Deadlock or AssertionError."""
    first_pos = cached
    last_row = min(n_new, tile_row0 + 128) - 1
    kv_end = first_pos + last_row + 1
    n_tiles = (kv_end + bc - 1) // bc
    full = [MBar(1) for _ in range(st)]  # the producer's arrivals, modelled as one
    empty = [MBar(2) for _ in range(st)]  # one arrival a warpgroup (8 warps in the kernel)
    named = {1: NamedBar(), 2: NamedBar()}
    filled = {}  # stage -> tile it holds (set when the copies land)
    released = set()  # (warpgroup, tile)

    def wait(cond):
        while not cond():
            yield BLOCKED

    def producer():
        landed = []  # tiles issued whose copies have not been signalled
        for j in range(n_tiles):
            s = j % st
            if j >= st:
                yield from wait(lambda s=s, j=j: empty[s].done((j // st - 1) & 1))
                # both warpgroups are done with the tile that stage held
                assert (0, j - st) in released and (1, j - st) in released, ("refill", j)
            landed.append(j)  # issue tile j's copies
            yield
            if j > 0:  # wait for tile j - 1's copies, then signal it
                t = landed.pop(0)
                filled[t % st] = t
                full[t % st].arrive()
            yield
        if n_tiles > 0:
            t = landed.pop(0)
            filled[t % st] = t
            full[t % st].arrive()

    in_flight = []  # TMA: tiles issued, in order, whose bytes have not all landed
    producer_done = [False]

    def tma_producer():
        for j in range(n_tiles):
            s = j % st
            if j >= st:
                yield from wait(lambda s=s, j=j: empty[s].done((j // st - 1) & 1))
                assert (0, j - st) in released and (1, j - st) in released, ("refill", j)
            filled[s] = None  # arrive.expect_tx, then the copies start writing the stage
            in_flight.append(j)
            yield
        # Stay until the last tiles' copies have landed.
        for j in range(max(0, n_tiles - st), n_tiles):
            yield from wait(lambda j=j: full[j % st].done((j // st) & 1))
        assert not in_flight, "CTA retiring with copies in flight"
        producer_done[0] = True

    def copy_engine():
        while not producer_done[0] or in_flight:
            if in_flight and rng.random() < 0.5:
                t = in_flight.pop(0)  # the tile's last byte lands: the phase completes
                filled[t % st] = t
                full[t % st].arrive()
                yield
            elif producer_done[0] and not in_flight:
                return
            else:
                yield BLOCKED if not in_flight else None

    def tiles(w):
        r0 = tile_row0 + w * 64
        return (first_pos + min(n_new - 1, r0 + 63)) // bc + 1 if r0 < n_new else 0

    def consumer(wg):
        t0, t1 = tiles(0), tiles(1)
        mine = t1 if wg else t0

        def wait_tile(j):
            yield from wait(lambda: full[j % st].done((j // st) & 1))
            assert filled.get(j % st) == j, ("stale stage", wg, j)

        def release(j):
            released.add((wg, j))
            empty[j % st].arrive()

        def compute(j):
            assert filled.get(j % st) == j, ("tile refilled while read", wg, j)

        if not pingpong:
            for j in range(n_tiles):
                yield from wait_tile(j)
                if j < mine:
                    compute(j)
                    yield
                release(j)
                yield
            return
        pp = t0 > 0 and t1 > 0
        slots = max(t0, t1) + 1
        slot = 0

        def sched_wait():
            if pp:
                b = named[1 + wg]
                gen = b.generation
                b.add()
                yield from wait(lambda: b.generation != gen)

        def sched_pass():
            nonlocal slot
            if pp:
                named[2 - wg].add()
            slot += 1

        if pp and wg == 1:
            named[1].add()
        if mine > 0:
            yield from wait_tile(0)
            yield from sched_wait()
            compute(0)  # S(0)
            sched_pass()
            yield
            for j in range(1, mine):
                yield from wait_tile(j)
                yield from sched_wait()
                compute(j)  # S(j)
                compute(j - 1)  # P V(j - 1)
                sched_pass()
                yield
                release(j - 1)
                yield
            yield from sched_wait()
            compute(mine - 1)
            sched_pass()
            yield
            release(mine - 1)
        for j in range(mine, n_tiles):
            yield from wait_tile(j)
            release(j)
            yield
        while slot < slots:
            yield from sched_wait()
            sched_pass()
            yield
        if pp and wg == 0:
            yield from sched_wait()

    agents = [tma_producer(), copy_engine()] if tma else [producer()]
    agents += [consumer(0), consumer(1)]
    live = list(agents)
    steps = 0
    stuck = 0  # consecutive steps in which every agent picked was waiting
    while live:
        a = rng.choice(live)
        steps += 1
        try:
            what = next(a)
        except StopIteration:
            live.remove(a)
            stuck = 0
            continue
        stuck = stuck + 1 if what is BLOCKED else 0
        if stuck > 2000:
            raise Deadlock((n_new, cached, tile_row0, bc, st, pingpong))
    # Every stage's phases balance: each tile was filled once and released by both.
    assert len(released) == 2 * n_tiles, ("releases", len(released), n_tiles)
    return steps


def main():
    rng = random.Random(7)
    cases = [(1, 0), (77, 0), (130, 500), (1024, 0), (300, 2000), (64, 0), (65, 0), (128, 0),
             (129, 63), (200, 1), (2048, 0), (17, 4095)]
    cases += [(rng.randint(1, 700), rng.randint(0, 3000)) for _ in range(40)]
    designs = [(64, 4, False, False), (64, 4, True, False), (128, 3, True, False), (128, 3, True, True)]
    ctas = 0
    for bc, st, pp, tma in designs:
        for n_new, cached in cases:
            for tile in range((n_new + 127) // 128):
                for _ in range(3):  # three schedules each
                    run_cta(n_new, cached, tile * 128, bc, st, pp, rng, tma)
                    ctas += 1
    print(f"pipeline_model: {ctas} CTA runs of the ws, pp, pp128 and tma protocols finished, "
          "no stale or refilled tile read")
    # The ring ws_stages rules out must deadlock somewhere.
    found = False
    for n_new, cached in cases:
        for tile in range((n_new + 127) // 128):
            try:
                run_cta(n_new, cached, tile * 128, 128, 2, True, rng)
            except Deadlock:
                found = True
                break
        if found:
            break
    if not found:
        sys.exit("pipeline_model: the two-stage 128-key ring did not deadlock: the model cannot fail")
    print("pipeline_model: the two-stage 128-key ring deadlocks, as ws_stages says")


if __name__ == "__main__":
    main()
