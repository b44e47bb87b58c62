"""Upper level: tabu search over GPU grouping and phase designation (plus the exhaustive reference
and the phase-only search used by re-scheduling).

A state is a list of GPU groups and one phase per group. Moves: flip a group's phase, swap the
phases of a prefill and a decode group, move a GPU between groups, swap GPUs of different nodes,
merge two groups, split one (by node or in half). GPUs of one node are interchangeable, so moves
pick a node rather than a GPU id, and candidates are deduplicated up to that interchangeability,
never including the current state (a null move would pin the search at a local optimum). The tabu
list holds recently destroyed (group composition, phase) pairs; a move that recreates one is tabu
unless it beats the best score so far (aspiration). The search stops at an iteration cap, after
`patience` iterations without improvement, or at the time limit. Candidates are scored
best-bound-first and the scan stops once no remaining upper bound can beat the best candidate seen;
a candidate that passes the capacity bound must also pass the route-capacity bound (KV transfer time
counted, still no LP) before its LP is solved.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .parallel import PHASES, GroupPerf
from .planner import COLOCATED, Planner, Progress, Signature

Group = tuple[str, ...]
OTHER = {"prefill": "decode", "decode": "prefill"}


def _others(phase: str, phases: Sequence[str]) -> list[str]:
    """The phases a group of `phase` can flip to (prefill <-> decode first, so the disaggregated
    moves keep their order)."""
    return [q for q in dict.fromkeys(([OTHER[phase]] if phase in OTHER else []) + list(phases)) if q != phase]


@dataclass(frozen=True)
class State:
    groups: tuple[Group, ...]
    phases: tuple[str, ...]


@dataclass
class SearchResult:
    groups: list[list[str]]
    phases: list[str]
    score: float
    iterations: int
    seconds: float


def _gkey(g: Sequence[str]) -> tuple:
    return tuple(sorted(g, key=_gpu_key))


def _gpu_key(g: str) -> tuple[str, int]:
    node, _, idx = g.rpartition(":")
    return (node, int(idx) if idx.isdigit() else 0)


def _node(g: str) -> str:
    return g.split(":", 1)[0]


# --- initial state: bandwidth clustering -------------------------------------------------------------
def initial_state(planner: Planner, granularity: str = "min") -> State:
    """Nodes are the natural fast-link clusters. Merge a node none of whose GPU subsets can hold the
    model with its best-linked neighbour (agglomerative, by bandwidth); cut a node that can into
    the smallest groups that hold the model ("min") or keep it whole ("node"); then give phases by
    the prefill/decode capacity ratio."""
    if granularity == "chain":
        return chain_state(planner)
    cl = planner.cluster
    clusters: list[list[str]] = [[n.name] for n in cl.nodes]

    def ids(nodes: list[str]) -> list[str]:
        return [g for n in nodes for g in cl.node(n).gpu_ids()]

    def ok(group: Sequence[str]) -> bool:
        return any(planner.capacity(group, ph) > 0 for ph in planner.phases)

    def smallest(members: list[str]) -> int | None:
        return next((m for m in range(1, len(members) + 1) if ok(members[:m])), None)

    while len(clusters) > 1:
        bad = [c for c in clusters if smallest(ids(c)) is None]
        if not bad:
            break
        c = bad[0]
        others = [o for o in clusters if o is not c]
        best = max(others, key=lambda o: (max(cl.gbps(a, b) for a in c for b in o), -len(ids(o))))
        clusters.remove(c)
        clusters.remove(best)
        clusters.append(c + best)
    if granularity.startswith("random"):  # a random cut of each cluster, for restarts
        rng = random.Random(granularity)
        groups_r: list[Group] = []
        for c in clusters:
            members = ids(c)
            rng.shuffle(members)
            while members:
                m = rng.randint(1, min(4, len(members)))
                groups_r.append(tuple(members[:m]))
                members = members[m:]
        return State(tuple(groups_r), tuple(_ratio_phases(planner, groups_r)))
    groups: list[Group] = []
    for c in clusters:
        members = ids(c)
        size = smallest(members) if len(c) == 1 else None
        if size is None or (granularity == "node" and ok(members)):
            groups.append(tuple(members))
        else:
            groups += [tuple(members[i:i + size]) for i in range(0, len(members), size)]
    phases = _ratio_phases(planner, groups)
    return State(tuple(groups), tuple(phases))


def _link_chain(planner: Planner, start: int = 0) -> list[str]:
    """Nodes in a greedy widest-next-link chain from node `start` (consecutive nodes are well linked)."""
    cl = planner.cluster
    left = [n.name for n in cl.nodes]
    chain = [left.pop(start)]
    while left:
        nxt = max(left, key=lambda b: (cl.gbps(chain[-1], b), -left.index(b)))
        left.remove(nxt)
        chain.append(nxt)
    return chain


def chain_state(planner: Planner, max_groups: int = 16) -> State:
    """The best two-size cut by the planner's own score. DistServe-style: prefill groups of one size and
    decode groups of another, cut along the widest-link chain (from every node for <= 4 nodes), prefill
    first or decode first; with one size, every designation for <= 6 groups, else by capacity ratio.
    Only groups inside one node or made of whole nodes. These designations are restrictions of the
    search space, so keeping the best of them as a floor means the search never returns less."""
    cl = planner.cluster
    cands: list[tuple[list[Group], list[str]]] = []
    starts = range(len(cl.nodes)) if len(cl.nodes) <= 4 else range(1)  # small clusters: every chain start
    for k in starts:
        _two_size_cuts([g for n in _link_chain(planner, k) for g in cl.node(n).gpu_ids()], planner, max_groups,
                       cands)
    best, best_score = cands[0] if cands else ([], []), -1.0
    for b, i in sorted(((planner.bound(g, p), i) for i, (g, p) in enumerate(cands)), reverse=True):
        if b <= best_score * (1 + 1e-9):
            break
        g, p = cands[i]
        if planner.route_bound(g, p) <= best_score * (1 + 1e-9):
            continue
        sc = planner.score(g, p)
        if sc > best_score:
            best, best_score = (g, p), sc
    return _make(list(best[0]), list(best[1]))


def _two_size_cuts(ids: list[str], planner: Planner, max_groups: int,
                   cands: list[tuple[list[Group], list[str]]]) -> None:
    """Append the two-size cuts of `ids` whose groups sit inside one node or are whole nodes."""
    cl = planner.cluster

    def aligned(groups: list[Group]) -> bool:
        for g in groups:
            nodes = {_node(x) for x in g}
            if len(nodes) > 1 and any(sum(_node(x) == nd for x in g) != cl.node(nd).count for nd in nodes):
                return False
        return True

    out: list[tuple[list[Group], list[str]]] = []
    _cuts(ids, planner, max_groups, out)
    cands += [c for c in out if aligned(c[0])]


def _cuts(ids: list[str], planner: Planner, max_groups: int, cands: list[tuple[list[Group], list[str]]]) -> None:
    n = len(ids)
    sizes = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= n and n % k == 0]
    for sp in sizes:
        for sd in sizes:
            if sp == sd:  # one uniform cut: every designation when few groups, else by capacity ratio
                groups = [tuple(ids[i:i + sp]) for i in range(0, n - sp + 1, sp)]
                if COLOCATED in planner.phases and len(groups) <= max_groups:  # and all colocated (no LP)
                    cands.append((groups, [COLOCATED] * len(groups)))
                if len(groups) <= 6:
                    cands += [(groups, list(ph)) for ph in itertools.product(PHASES, repeat=len(groups))
                              if "prefill" in ph and "decode" in ph]
                elif len(groups) <= max_groups:
                    cands.append((groups, _ratio_phases(planner, groups)))
                continue
            for n_p in range(1, n // sp + 1):
                n_d = (n - n_p * sp) // sd
                if n_d < 1 or n_p + n_d > max_groups:
                    continue
                pre = [tuple(ids[i * sp:(i + 1) * sp]) for i in range(n_p)]
                dec = [tuple(ids[n_p * sp + j * sd:n_p * sp + (j + 1) * sd]) for j in range(n_d)]
                cands.append((pre + dec, ["prefill"] * n_p + ["decode"] * n_d))
                dec = [tuple(ids[j * sd:(j + 1) * sd]) for j in range(n_d)]
                pre = [tuple(ids[n_d * sd + i * sp:n_d * sd + (i + 1) * sp]) for i in range(n_p)]
                cands.append((dec + pre, ["decode"] * n_d + ["prefill"] * n_p))


def _ratio_phases(planner: Planner, groups: Sequence[Group], keep: Sequence[str] = ()) -> list[str]:
    """Prefill to the groups best at it (by capacity ratio), as many as balance the two sides. Groups
    whose phase in `keep` is colocated stay colocated."""
    fixed = {i for i, p in enumerate(keep) if p == COLOCATED}
    caps = [(planner.capacity(g, "prefill"), planner.capacity(g, "decode")) for g in groups]
    order = sorted((i for i in range(len(groups)) if i not in fixed), key=lambda i: -(caps[i][0] / (caps[i][1] + 1e-9)))
    best_n, best_b = 0, -1.0
    for n in range(len(order) + 1):
        pre = sum(caps[i][0] for i in order[:n])
        dec = sum(caps[i][1] for i in order[n:])
        if min(pre, dec) > best_b:
            best_n, best_b = n, min(pre, dec)
    chosen = set(order[:best_n])
    return [COLOCATED if i in fixed else "prefill" if i in chosen else "decode" for i in range(len(groups))]


# --- neighbourhood -----------------------------------------------------------------------------------
def _make(groups: list[Group], phases: list[str]) -> State:
    pairs = sorted(((_gkey(g), p) for g, p in zip(groups, phases, strict=True) if g))
    return State(tuple(g for g, _ in pairs), tuple(p for _, p in pairs))


def _take(group: Group, node: str) -> tuple[str, Group]:
    """Remove one GPU of `node` (the highest index, so equivalent moves coincide)."""
    cand = [g for g in group if _node(g) == node]
    g = max(cand, key=_gpu_key)
    return g, tuple(x for x in group if x != g)


Move = tuple[tuple[int, ...], list[Group], list[str]]  # (groups removed, groups added, their phases)


def moves(state: State, phases: Sequence[str] = PHASES) -> list[Move]:
    """Every move from a state, cheaply described (flips first); `apply` builds the states. `phases`: the
    phases a group may take (the planner's `phases`: with colocated, a flip or a new group may also be
    colocated)."""
    G, P = list(state.groups), list(state.phases)
    k = len(G)
    out: list[Move] = []

    def replace(idx: Sequence[int], new_groups: list[Group], new_phases: list[str]) -> None:
        out.append((tuple(idx), new_groups, new_phases))

    for i in range(k):  # flip (to each other phase)
        for q in _others(P[i], phases):
            replace([i], [G[i]], [q])
    for i, j in itertools.combinations(range(k), 2):  # swap the phases of a prefill and a decode group
        if P[i] != P[j]:
            replace([i, j], [G[i], G[j]], [P[j], P[i]])
    for i, j in itertools.combinations(range(k), 2):  # merge
        for ph in dict.fromkeys((P[i], P[j])):  # ordered: the search must be deterministic
            replace([i, j], [G[i] + G[j]], [ph])
    for i in range(k):  # split: by node, or a single-node group in halves
        nodes = sorted({_node(g) for g in G[i]})
        parts: list[tuple[Group, Group]] = []
        if len(nodes) > 1:
            for n in nodes:
                parts.append((tuple(g for g in G[i] if _node(g) == n), tuple(g for g in G[i] if _node(g) != n)))
        elif len(G[i]) > 1:
            s = _gkey(G[i])
            parts.append((s[: len(s) // 2], s[len(s) // 2:]))
        for a, b in parts:
            for pb in (P[i], *_others(P[i], phases)):
                replace([i], [a, b], [P[i], pb])
    for i in range(k):  # detach one GPU of a node into a group of its own
        if len(G[i]) > 1:
            for n in sorted({_node(g) for g in G[i]}):
                g, rest = _take(G[i], n)
                for ph in phases:
                    replace([i], [rest, (g,)], [P[i], ph])
    for i in range(k):  # move one GPU of a node from group i to group j
        for n in sorted({_node(g) for g in G[i]}):
            g, rest = _take(G[i], n)
            for j in range(k):
                if j != i:
                    replace([i, j], [rest, G[j] + (g,)], [P[i], P[j]])
    for i, j in itertools.combinations(range(k), 2):  # swap GPUs of different nodes
        ni = sorted({_node(g) for g in G[i]})
        nj = sorted({_node(g) for g in G[j]})
        for a in ni:
            for b in nj:
                if a == b:
                    continue
                ga, ri = _take(G[i], a)
                gb, rj = _take(G[j], b)
                replace([i, j], [ri + (gb,), rj + (ga,)], [P[i], P[j]])
    return out


def apply(state: State, move: Move, planner: Planner | None = None) -> list[State]:
    """The state after a move; with a planner, a regrouping move also comes with its phases
    re-balanced by capacity ratio (a compound move that crosses phase plateaus)."""
    idx, new_groups, new_phases = move
    gs = [g for i, g in enumerate(state.groups) if i not in idx] + new_groups
    ps = [p for i, p in enumerate(state.phases) if i not in idx] + new_phases
    out = [_make(gs, ps)]
    if planner is not None and len(idx) + len(new_groups) > 1:
        live = [(g, p) for g, p in zip(gs, ps, strict=True) if g]
        groups = [g for g, _ in live]
        out.append(_make(groups, _ratio_phases(planner, groups, [p for _, p in live])))
    return out


def neighbours(state: State, planner: Planner | None = None) -> list[State]:
    """Every state one move away."""
    ms = moves(state, planner.phases if planner is not None else PHASES)
    return list(dict.fromkeys(s for m in ms for s in apply(state, m, planner)))


def _attrs(planner: Planner, s: State) -> set[tuple[Signature, str]]:
    return {(planner.signature(g), p) for g, p in zip(s.groups, s.phases, strict=True)}


def _canon(planner: Planner, s: State) -> tuple:
    """A state up to the interchangeability of a node's GPUs (equal keys score alike and have the
    same neighbourhood up to relabelling)."""
    return tuple(sorted((planner.signature(g), p) for g, p in zip(s.groups, s.phases, strict=True)))


# --- tabu search ---------------------------------------------------------------------------------------
def default_options(n_gpus: int) -> dict[str, int]:
    return {
        "max_iters": 40 + 2 * n_gpus,
        "patience": 30 if n_gpus <= 16 else 20,
        "tenure": 7,
        "max_neighbours": 10_000 if n_gpus <= 16 else 200,
        "restarts": 1 if n_gpus <= 32 else 0,
    }


def tabu_search(planner: Planner, time_limit_s: float | None = None, progress: Progress | None = None,
                seed: int = 0, **opts: int) -> SearchResult:
    """Tabu search from the bandwidth-clustering start, restarted from other starts while the
    restart budget (small clusters) and the time limit allow; the best state wins. The best
    two-size (DistServe-style) cut along the widest-link chain (`chain_state`) is scored first and
    is a floor (the search never returns a state its own objective ranks below that restriction);
    with `chain_start=2` (default) it is also the second start, in place of the whole-node one."""
    t0 = time.monotonic()
    o = default_options(planner.cluster.n_gpus)
    o.update(opts)
    chain = o.get("chain_start", 2)  # 0: off; 1: the chain cut is a floor; 2: also the second start
    second = "chain" if chain >= 2 else "node"
    starts = ["min", second, *(f"random-{seed}-{i}" for i in range(max(0, o["restarts"] - 1)))]
    starts = starts[: 1 + max(0, o["restarts"])]
    best: SearchResult | None = None
    if chain:  # the best structured (DistServe-style) cut: a floor for the search
        c = chain_state(planner)
        sc = planner.score(c.groups, c.phases) if c.groups else 0.0
        if sc > 0:
            best = SearchResult([list(g) for g in c.groups], list(c.phases), sc, 0, time.monotonic() - t0)
    total_it = 0
    for k, gran in enumerate(starts):
        left = None if time_limit_s is None else time_limit_s - (time.monotonic() - t0)
        if left is not None and left <= 0:
            break
        start = initial_state(planner, gran)
        res = _tabu(planner, start, o, random.Random(seed + k), left, progress, t0, total_it,
                    best.score if best else 0.0)
        total_it += res.iterations
        if best is None or res.score > best.score * (1 + 1e-9):
            best = res
    assert best is not None
    best.iterations = total_it
    best.seconds = time.monotonic() - t0
    return best


def candidates(planner: Planner, state: State, ms: Sequence[Move]) -> list[State]:
    """The states the moves lead to, one per state up to GPU interchangeability, never the current
    state itself: a null move (e.g. swapping two single-GPU groups of one phase) would otherwise win
    at every local optimum (same score, nothing tabu) and pin the search there."""
    seen = {_canon(planner, state)}
    out = []
    for c in dict.fromkeys(s for m in ms for s in apply(state, m, planner)):
        k = _canon(planner, c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def _secondary(planner: Planner, s: State) -> float:
    """Tie-break on plateaus: more total capacity leaves room for a later flip to pay off."""
    return sum(planner.capacity(g, p) for g, p in zip(s.groups, s.phases, strict=True))


def _tabu(planner: Planner, start: State, o: dict[str, int], rng: random.Random, time_limit_s: float | None,
          progress: Progress | None, t0: float, it0: int, best_before: float) -> SearchResult:
    t_start = time.monotonic()
    cur = start
    best, best_score = cur, planner.score(cur.groups, cur.phases)
    tabu: dict[tuple[Signature, str], int] = {}
    since_best = 0
    it = 0
    while it < o["max_iters"] and since_best < o["patience"]:
        if time_limit_s is not None and time.monotonic() - t_start > time_limit_s:
            break
        it += 1
        ms = moves(cur, planner.phases)
        n_flip = len(cur.groups) * (len(planner.phases) - 1)  # always look at every phase flip, sample the rest
        if len(ms) - n_flip > o["max_neighbours"] // 2:
            ms = ms[:n_flip] + rng.sample(ms[n_flip:], o["max_neighbours"] // 2)
        cands = candidates(planner, cur, ms)
        cur_attrs = _attrs(planner, cur)
        ranked = sorted(((planner.bound(c.groups, c.phases), i) for i, c in enumerate(cands)), reverse=True)
        chosen, chosen_key = None, (-1.0, -1.0)
        for b, i in ranked:
            if b < chosen_key[0] * (1 - 1e-9):
                break  # nothing further down can beat the best candidate found
            c = cands[i]
            sec = _secondary(planner, c)
            if b <= chosen_key[0] * (1 + 1e-9) and sec <= chosen_key[1]:
                continue  # can at best tie on score and loses the tie-break
            rb = planner.route_bound(c.groups, c.phases)  # tighter, still no LP
            if rb < chosen_key[0] * (1 - 1e-6) or (rb <= chosen_key[0] * (1 + 1e-9) and sec <= chosen_key[1]):
                continue
            sc = planner.score(c.groups, c.phases)
            created = _attrs(planner, c) - cur_attrs
            is_tabu = any(tabu.get(a, 0) >= it for a in created)
            if is_tabu and not sc > best_score * (1 + 1e-9):
                continue
            key = (sc, sec)
            if sc > chosen_key[0] * (1 + 1e-9) or (sc >= chosen_key[0] * (1 - 1e-9) and sec > chosen_key[1]):
                chosen, chosen_key = c, key
        if chosen is None:
            break
        for a in cur_attrs - _attrs(planner, chosen):  # forbid re-creating what the move destroyed
            tabu[a] = it + o["tenure"]
        cur, cur_score = chosen, chosen_key[0]
        if cur_score > best_score * (1 + 1e-9):
            best, best_score = cur, cur_score
            since_best = 0
        else:
            since_best += 1
        if progress:
            progress(it0 + it, max(best_score, best_before), time.monotonic() - t0)
    return SearchResult([list(g) for g in best.groups], list(best.phases), best_score, it,
                        time.monotonic() - t_start)


# --- phase-only search (lightweight re-scheduling) -----------------------------------------------------
def phase_search(planner: Planner, ids: list[str], perf: dict[tuple[str, str], GroupPerf],
                 start: list[str], max_rounds: int = 50, memo: dict | None = None) -> list[str]:
    """Best-improvement phase flips from the current designation (layouts fixed), bound-pruned.
    A flip must gain more than a hair: needless flips cost a drain on the replica.

    The phases are prefill and decode, and colocated when the planner allows it (`perf` then holds each
    replica's colocated performance too): a designation scores the LP's rate over its prefill and decode
    replicas plus its colocated replicas' capacities, as `Planner.score` does. Each round ranks the flips by
    min(prefill, decode) capacity (+ colocated) and stops at the first that cannot beat the best so far;
    before its LP, a flip must also pass the route-capacity bound (KV transfer time counted). Both bounds
    only skip flips that could not win, so the result is the same as scoring every flip. `memo` (phases ->
    (codec, Orchestration) of the prefill and decode replicas) receives every solved designation, so the
    caller can reuse the final one's LP."""
    solved: dict[tuple[str, ...], tuple] = {} if memo is None else memo
    phases = planner.phases

    def items(ph: tuple[str, ...]) -> list[tuple[str, GroupPerf]]:
        return [(r, perf[(r, p)]) for r, p in zip(ids, ph, strict=True)
                if p != COLOCATED and perf[(r, p)].capacity > 0]

    def colocated(ph: tuple[str, ...]) -> float:
        return sum(perf[(r, p)].capacity for r, p in zip(ids, ph, strict=True) if p == COLOCATED)

    def score(ph: tuple[str, ...]) -> float:
        if ph not in solved:
            solved[ph] = planner.choose_codec(items(ph))
        return solved[ph][1].rate + colocated(ph)

    def bound(ph: tuple[str, ...]) -> float:
        pre = sum(perf[(r, p)].capacity for r, p in zip(ids, ph, strict=True) if p == "prefill")
        dec = sum(perf[(r, p)].capacity for r, p in zip(ids, ph, strict=True) if p == "decode")
        return min(pre, dec) + colocated(ph)

    cur = tuple(p if p in phases else "decode" for p in start)
    cur_score = score(cur)
    for _ in range(max_rounds):
        cands = [cur[:i] + (q,) + cur[i + 1:] for i in range(len(cur)) for q in _others(cur[i], phases)]
        best, best_score = None, cur_score * (1 + 1e-6)
        for b, c in sorted(((bound(c), c) for c in cands), reverse=True):
            if b <= best_score:
                break
            if c not in solved and (planner.items_bound(items(c)) + colocated(c)) * (1 + 1e-7) <= best_score:
                continue  # its LP could not beat best_score
            sc = score(c)
            if sc > best_score:
                best, best_score = c, sc
        if best is None:
            break
        cur, cur_score = best, best_score
    return list(cur)


# --- exhaustive reference (small clusters) -------------------------------------------------------------
def exhaustive_search(planner: Planner) -> SearchResult:
    """Best score over every grouping and phase designation, up to the interchangeability of a
    node's GPUs (which leaves the score unchanged). Groups that cannot serve their phase score as
    idle GPUs, so only servable (composition, phase) types are combined. For tests and benchmarks."""
    t0 = time.monotonic()
    cl = planner.cluster
    counts = [n.count for n in cl.nodes]
    names = [n.name for n in cl.nodes]
    types: list[tuple[tuple[int, ...], str, float]] = []
    for vec in itertools.product(*(range(c + 1) for c in counts)):
        if not any(vec):
            continue
        ids = [f"{names[i]}:{j}" for i, c in enumerate(vec) for j in range(c)]
        for ph in planner.phases:
            cap = planner.capacity(ids, ph)
            if cap > 0:
                types.append((vec, ph, cap))
    combos: list[tuple[float, list[int]]] = []

    def rec(start: int, remaining: list[int], chosen: list[int], pre: float, dec: float, colo: float) -> None:
        if (pre > 0 and dec > 0) or colo > 0:
            combos.append((min(pre, dec) + colo, list(chosen)))  # planner.bound
        for t in range(start, len(types)):
            vec, ph, cap = types[t]
            if all(v <= r for v, r in zip(vec, remaining, strict=True)):
                chosen.append(t)
                rec(t, [r - v for r, v in zip(remaining, vec, strict=True)], chosen,
                    pre + (cap if ph == "prefill" else 0), dec + (cap if ph == "decode" else 0),
                    colo + (cap if ph == COLOCATED else 0))
                chosen.pop()

    rec(0, counts, [], 0.0, 0.0, 0.0)
    combos.sort(key=lambda x: -x[0])
    best_score, best_state = 0.0, ([], [])
    for b, chosen in combos:
        if b <= best_score * (1 + 1e-9):
            break
        groups, phases = _materialise(names, [types[t] for t in chosen])
        sc = planner.score(groups, phases)
        if sc > best_score:
            best_score, best_state = sc, (groups, phases)
    return SearchResult(best_state[0], best_state[1], best_score, len(combos), time.monotonic() - t0)


def _materialise(names: list[str], chosen: list[tuple[tuple[int, ...], str, float]]) -> tuple[list, list]:
    nxt = [0] * len(names)
    groups, phases = [], []
    for vec, ph, _ in chosen:
        g = []
        for i, c in enumerate(vec):
            g += [f"{names[i]}:{nxt[i] + j}" for j in range(c)]
            nxt[i] += c
        groups.append(g)
        phases.append(ph)
    return groups, phases
