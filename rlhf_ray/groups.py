"""Model groups: K Ray actors forming one torch.distributed world, placed in their role's placement group.

    plan = placement_plan(cfg)                        # every role's placement group, ready or a PlacementError
    group = ModelGroup("actor", PolicyLearner, 2, resources=cfg.placement.actor, placement=plan["actor"],
                       worker_kwargs={...})
    logprobs = group.run_sharded("logprobs", batch)   # rows split by data-parallel rank, results gathered in order
    group.run("save_checkpoint", path)                # the same call on every rank (collectives need all of them)

Each rank is a Ray actor whose body subclasses `DistributedWorker`. Start-up, in order: the actors are created
in their bundles (each chooses its own device first thing, env.choose_device, and checks through
`ray.util.get_current_placement_group()` that it sits in its role's group), rank 0 picks a free port on its node,
every rank joins the world together (gloo on CPU, NCCL on GPU, through `deepspeed.init_distributed`), then every
rank runs `setup()` together (DeepSpeed engines are built collectively) and reports what it chose
(`group.reports`: device, backend, dtype).

Placement (config `placement.*`): one placement group per role by default; `colocate_actor_reference` /
`colocate_critic_reward` put two roles in one group, each role taking an equal share of every bundle's CPUs and
GPUs (as OpenRLHF's colocation does). A group that cannot be placed fails after `ray.placement_timeout_s`
naming the role and the missing resources (resources.ready_placement_group): never a silent hang.

Batches are dicts of row-major values: tensors (B, ...) and lists of length B are split by rows; anything else
(a scalar, a string) goes to every rank unchanged. `run_sharded` pads the rows (repeating the last row) to a
multiple of the world size so every rank runs the same number of forward passes (ZeRO-3 gathers parameters
collectively: an uneven count would deadlock) and drops the padded rows from the gathered result. A worker
method sees how many of its rows are padding in `self.padding_rows` (reward functions never receive them).
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch

from rlhf_ray.config import Config, RoleResources
from rlhf_ray.env import worker_env_vars

Batch = dict[str, Any]
# Collectives block until every rank arrives; a rank that died is noticed by Ray first, so this only bounds a
# genuinely stuck peer (NCCL's own default is 30 minutes as well).
DIST_TIMEOUT = timedelta(minutes=30)


# ------------------------------------------------------------------------------------------ placement
@dataclass
class RolePlacement:
    """Where one role's ranks go: a ready placement group, and the share of each bundle the role takes."""

    role: str
    name: str  # the placement group's name: "actor", or "actor+reference" when colocated
    placement_group: Any
    bundles: list[dict[str, float]]
    share: float = 1.0  # 1 / number of roles sharing the group


def unique_label(label: str) -> str:
    """`label`, or `label#2`, `#3`, ...: Ray placement-group names (rlhf_ray:<label>) must be unique among live
    groups, and a role may have two at once (a group rebuilt from a checkpoint, two runs on one cluster)."""
    from ray.util import placement_group_table

    taken = {pg.get("name") for pg in placement_group_table().values() if pg.get("state") != "REMOVED"}
    n, candidate = 1, label
    while f"rlhf_ray:{candidate}" in taken:
        n += 1
        candidate = f"{label}#{n}"
    return candidate


def placement_plan(cfg: Config, roles: Optional[list[str]] = None) -> dict[str, RolePlacement]:
    """Create (and wait for) the placement groups of the PPO layout (resources.ppo_layout); colocated roles map to
    the same group. `roles` restricts which layouts are created (by any role they hold). All or nothing: when one
    group cannot be placed, the ones already placed are removed before the error propagates."""
    from rlhf_ray.resources import ppo_layout, ready_placement_group

    plan: dict[str, RolePlacement] = {}
    try:
        for layout in ppo_layout(cfg):
            members = layout.role.split("+")
            if roles is not None and not set(members) & set(roles):
                continue
            if cfg.placement.layout == "hybrid" and layout.role.startswith("generator"):
                continue  # the engine lives in the actor's rank, in the actor's placement group

            pg = ready_placement_group(unique_label(layout.role), layout.bundles, layout.strategy,
                                       cfg.ray.placement_timeout_s)
            for role in members:
                plan[role] = RolePlacement(role, layout.role, pg, layout.bundles, share=1.0 / len(members))
    except BaseException:
        remove_placement(plan)  # a half-placed layout would starve every later placement in this cluster
        raise
    return plan


def remove_placement(plan: dict[str, RolePlacement]) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in {id(p.placement_group): p.placement_group for p in plan.values()}.values():
        remove_placement_group(pg)


def own_placement(role: str, resources: RoleResources, num_workers: int, timeout_s: float) -> RolePlacement:
    """A placement group for one role alone (what placement_plan gives a role that is not colocated)."""
    from rlhf_ray.resources import ready_placement_group, role_bundles

    bundles = role_bundles(resources, num_workers)
    return RolePlacement(role, role, ready_placement_group(unique_label(role), bundles, "PACK", timeout_s), bundles)


# ------------------------------------------------------------------------------------- batch sharding
def batch_rows(batch: Batch) -> int:
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list, tuple)):
            return len(value)
    raise ValueError(f"batch has no tensor or list field to split by rows (keys: {sorted(batch)})")


def _rows(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, (list, tuple)):
        return [value[i] for i in index.tolist()]
    return value


def shard_batch(batch: Batch, rank: int, world: int, pad: bool = True) -> tuple[Batch, int]:
    """This rank's contiguous block of rows, and the batch's real row count. With `pad`, rows are padded (the last
    row repeated) to a multiple of `world`; without it the rows must divide evenly."""
    n = batch_rows(batch)
    if n == 0:
        raise ValueError("empty batch")
    if n % world and not pad:
        raise ValueError(f"batch of {n} rows does not split evenly over {world} data-parallel ranks")
    per_rank = -(-n // world)
    index = (torch.arange(rank * per_rank, (rank + 1) * per_rank)).clamp(max=n - 1)
    return {k: _rows(v, index) for k, v in batch.items()}, n


def real_rows(n: int, rank: int, world: int) -> int:
    """How many of rank `rank`'s rows in shard_batch's split of `n` rows are real (the rest is padding)."""
    per_rank = -(-n // world)
    return max(0, min(per_rank, n - rank * per_rank))


def concat_results(results: list[Any], n: int) -> Any:
    """Rank results (each rows-first) joined in rank order and cut to the batch's `n` real rows."""
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(results)[:n]
    if isinstance(first, dict):
        return {k: concat_results([r[k] for r in results], n) for k in first}
    if isinstance(first, (list, tuple)):
        return [x for r in results for x in r][:n]
    raise TypeError(f"cannot gather results of type {type(first).__name__} by rows")


def mean_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Average of numeric stats over ranks (each rank reports the mean over its own micro-batches)."""
    keys = per_rank[0].keys()
    return {k: sum(float(s[k]) for s in per_rank) / len(per_rank) for k in keys}


def _concat_task(n: int, *results):
    return concat_results(list(results), n)


@functools.cache
def _remote_concat():
    import ray

    return ray.remote(num_cpus=0)(_concat_task)  # joins rank results inside the object store


# ------------------------------------------------------------------------------------------ worker side
class DistributedWorker:
    """Body of one rank's Ray actor. Subclasses build their model in `setup()` (called on all ranks together)."""

    def __init__(self, role: str, rank: int, world_size: int, placement_group_id: Optional[str] = None):
        from rlhf_ray.env import choose_device

        # First thing, in this rank's own process: its device (and DS_ACCELERATOR, before deepspeed is imported).
        self.device_type = choose_device()
        self.backend: Optional[str] = None  # set by init_distributed
        self.allreduce: Optional[str] = None  # nccl, gloo or shm (DeepSpeed's shared-memory kernel): init_distributed
        self.dtype_name: Optional[str] = None  # what the model computes in; set by setup()
        import ray

        self.role, self.rank, self.world_size = role, rank, world_size
        if placement_group_id is not None:
            current = ray.util.get_current_placement_group()
            where = current.id.hex() if current is not None else None
            if where != placement_group_id:
                raise RuntimeError(f"{role} rank {rank}: expected to run in placement group {placement_group_id}, "
                                   f"but sits in {where}")
        self.placement_group_id = placement_group_id

    # -- start-up
    def node_info(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def pick_master_port(self) -> int:
        """A port free on this node right now (rank 0 hosts the rendezvous; no fixed ports)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_distributed(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int) -> str:
        from rlhf_ray.train.common import init_deepspeed_world, release_shm_name

        cuda = self.device_type == "cuda"
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so the device is always index 0 inside it.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0" if cuda else str(local_rank), LOCAL_WORLD_SIZE=str(local_world_size),
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if cuda:
            torch.cuda.set_device(0)
        self.backend = "nccl" if cuda else "gloo"
        # The helper SFT and RM workers use: on CPU, ZeRO's all-reduce through DeepSpeed's shm kernel when it can.
        self.allreduce = init_deepspeed_world(cuda, self.world_size, local_world_size, timeout=DIST_TIMEOUT)
        if self.allreduce == "shm":
            torch.distributed.barrier()  # every rank has mapped every rank's buffer: its /dev/shm name can go
            release_shm_name(self.rank)
        return self.allreduce

    def setup(self) -> None:
        """Build the model; runs on every rank together after init_distributed. Subclasses override."""

    def describe(self) -> dict:
        """What this rank chose in its own process (the driver only checks agreement: env.check_agreement)."""
        import ray

        return {"role": self.role, "rank": self.rank, "device": self.device_type, "backend": self.backend,
                "allreduce": self.allreduce, "dtype": self.dtype_name, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address()}

    # -- generic entry points the driver uses
    padding_rows = 0  # of the shard being processed: its last rows repeat the batch's last row (call_sharded)

    def call_sharded(self, method: str, batch: Batch, *args, pad: bool = True, **kwargs) -> tuple[int, Any]:
        shard, n = shard_batch(batch, self.rank, self.world_size, pad=pad)
        # Forwards run on the padding too (collectives need the same count on every rank); anything with effects
        # outside the world (a reward service) reads padding_rows and skips them.
        self.padding_rows = batch_rows(shard) - real_rows(n, self.rank, self.world_size)
        try:
            return n, getattr(self, method)(shard, *args, **kwargs)
        finally:
            self.padding_rows = 0

    def apply(self, fn: Callable, *args, **kwargs) -> Any:
        """Run `fn(worker, *args, **kwargs)` in this rank's process (tests, one-off inspections)."""
        return fn(self, *args, **kwargs)

    def current_placement_group_id(self) -> Optional[str]:
        import ray

        current = ray.util.get_current_placement_group()
        return current.id.hex() if current is not None else None


# ------------------------------------------------------------------------------------------ driver side
def get_all(refs: list) -> list:
    """ray.get of every rank's result, raising as soon as one rank failed (a dead rank's RayActorError) instead of
    first waiting for ranks that may be stuck in a collective with it (rlhf_ray/recovery.py replaces the group)."""
    import ray

    pending = list(refs)
    while len(pending) > 1:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


_ports_starting: set[tuple[str, int]] = set()  # (node, port) a rank 0 picked whose world is not up yet
_ports_lock = threading.Lock()


def reserve_port(node: str, pick: Callable[[], int], attempts: int = 8) -> int:
    """A port from `pick()` (rank 0's pick_master_port) that no other group starting in this driver holds on `node`.
    pick_master_port binds and releases, so two groups starting side by side with ranks 0 on one node can be handed
    the same port before either rendezvous binds it. Give it back with release_port once the world is up."""
    with _ports_lock:
        for _ in range(attempts):
            port = pick()
            if (node, port) not in _ports_starting:
                _ports_starting.add((node, port))
                return port
    raise RuntimeError(f"no free rendezvous port on node {node} after {attempts} tries: each one picked is held by "
                       f"another group starting on it")


def release_port(node: str, port: int) -> None:
    with _ports_lock:
        _ports_starting.discard((node, port))


def start_concurrently(start: Callable[[str], Any], roles: list[str]) -> tuple[dict[str, Any], Optional[BaseException]]:
    """`start(role)` for every role at once, a thread each: each blocks in its own ray.get while its ranks import,
    load and set up, so the roles' processes do that side by side instead of one after another (start-up is the
    slowest role's, not the sum). Waits for every one, so nothing is still starting when this returns. Returns the
    groups that started, by role, and the first failure in `roles` order (None if all started): the caller keeps
    what started, so that it can shut those down."""
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max(1, len(roles)), thread_name_prefix="rlhf-start") as pool:
        futures = {role: pool.submit(start, role) for role in roles}
        wait(futures.values())
    started = {role: f.result() for role, f in futures.items() if f.exception() is None}
    failure = next((f.exception() for f in futures.values() if f.exception() is not None), None)
    return started, failure


class ModelGroup:
    """K ranks of `worker_cls` in one torch.distributed world, inside `placement` (or a placement group of their
    own). Blocking calls return plain values; `*_async` / `as_ref=True` return ObjectRefs."""

    def __init__(self, role: str, worker_cls: type, num_workers: int, *, resources: RoleResources,
                 placement: Optional[RolePlacement] = None, worker_kwargs: Optional[dict] = None,
                 env_vars: Optional[dict[str, str]] = None, placement_timeout_s: float = 120.0,
                 setup_timeout_s: float = 900.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.role, self.num_workers = role, num_workers
        self.placement = placement or own_placement(role, resources, num_workers, placement_timeout_s)
        self._owns_placement = placement is None
        bundles = self.placement.bundles
        pg = self.placement.placement_group
        remote_cls = ray.remote(worker_cls)
        self.workers = []
        try:  # any failure from here on kills the ranks started so far and removes a placement group we own
            if num_workers > len(bundles):
                raise ValueError(f"{role}: {num_workers} ranks but its placement group '{self.placement.name}' has "
                                 f"only {len(bundles)} bundles; raise placement.<role>.num_workers of the group's "
                                 f"owner")
            for rank in range(num_workers):
                bundle = bundles[rank]
                self.workers.append(remote_cls.options(
                    max_restarts=0,
                    num_cpus=bundle.get("CPU", 0.0) * self.placement.share,
                    num_gpus=bundle.get("GPU", 0.0) * self.placement.share,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                    runtime_env={"env_vars": {**worker_env_vars(), **(env_vars or {})}},
                ).remote(role=role, rank=rank, world_size=num_workers, placement_group_id=pg.id.hex(),
                         **(worker_kwargs or {})))
            nodes = ray.get([w.node_info.remote() for w in self.workers], timeout=setup_timeout_s)
            port = reserve_port(nodes[0][0], lambda: ray.get(self.workers[0].pick_master_port.remote()))
            ranks_on_node = [[r for r, (n, _) in enumerate(nodes) if n == node] for node, _ in nodes]
            try:  # once the world is up, rank 0's rendezvous holds the port bound
                paths = ray.get([w.init_distributed.remote(nodes[0][1], port, ranks_on_node[r].index(r),
                                                           len(ranks_on_node[r]))
                                 for r, w in enumerate(self.workers)], timeout=setup_timeout_s)
            finally:
                release_port(nodes[0][0], port)
            if len(set(paths)) > 1:  # a rank on shm and one on gloo would wait for each other forever
                raise RuntimeError(f"{role} ranks disagree on the all-reduce path: {paths}")
            ray.get([w.setup.remote() for w in self.workers], timeout=setup_timeout_s)
            self.reports: list[dict] = ray.get([w.describe.remote() for w in self.workers], timeout=setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @property
    def dtype(self) -> Optional[str]:
        """The dtype the ranks reported computing in (None: no model, e.g. a reward scorer of functions only)."""
        return self.reports[0]["dtype"]

    # -- calls
    def run_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def run(self, method: str, *args, **kwargs) -> list:
        """The same call on every rank (collectives need all of them); one result per rank."""
        return get_all(self.run_async(method, *args, **kwargs))

    def run_sharded(self, method: str, batch, *args, pad: bool = True, as_ref: bool = False, **kwargs):
        """Call `method(shard)` on every rank with its rows of `batch` (a dict, or an ObjectRef of one: each rank
        then reads it from the object store, the driver never holds it) and gather the results in rank order.
        With as_ref=True the gathered result stays in the object store and its ObjectRef is returned."""
        import ray

        ref = batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)
        out = [w.call_sharded.options(num_returns=2).remote(method, ref, *args, pad=pad, **kwargs)
               for w in self.workers]
        n_refs, result_refs = [o[0] for o in out], [o[1] for o in out]
        if as_ref and len(result_refs) == 1:
            return result_refs[0]  # one rank, no padding: its result is the gathered one (no join task, no worker)
        if as_ref:
            return _remote_concat().remote(n_refs[0], *result_refs)
        return concat_results(get_all(result_refs), ray.get(n_refs[0]))

    def run_sharded_each(self, method: str, batch, *args, pad: bool = False, **kwargs) -> list:
        """Like run_sharded, but returns each rank's result as it is (for per-rank stats)."""
        import ray

        ref = batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)
        return [n_and_result[1] for n_and_result in get_all(
            [w.call_sharded.remote(method, ref, *args, pad=pad, **kwargs) for w in self.workers])]

    def apply(self, fn: Callable, *args, **kwargs) -> list:
        return self.run("apply", fn, *args, **kwargs)

    # -- lifetime
    def shutdown(self, remove_placement_group: Optional[bool] = None) -> None:
        """Kill the ranks; remove the placement group when this group created it (or when asked)."""
        import ray
        from ray.util.placement_group import remove_placement_group as remove_pg

        for w in getattr(self, "workers", []):
            ray.kill(w, no_restart=True)
        self.workers = []
        remove = remove_placement_group if remove_placement_group is not None else self._owns_placement
        if remove and not getattr(self, "_placement_removed", False):
            remove_pg(self.placement.placement_group)
            self._placement_removed = True
