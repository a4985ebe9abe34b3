"""Flatness of the robust (and clean) loss in weight space: the paper's average-case and worst-case measures.

Average-case (the paper's definition; its supplement gives the settings below)::

    avg = E_{nu in B_xi(w)} [ mean_i max_{||delta|| <= eps} L(x_i + delta; w + nu) ] - RLoss_ref(w)

Worst-case::

    worst = max_{restart a} mean_i L(x_i + delta_i^a; w + nu^a) - RLoss_ref(w)

with (nu^a, delta^a) from the joint weight+input attack (:mod:`robust_flat.weights.adversarial`) and the max taken
over the dataset-mean loss of each restart (as the code; docs/paper-vs-code.md#worst-case-restarts). The reference
RLoss_ref is PGD-20 with 10 restarts, worst restart per example. The clean-loss variants (``attack=None``;
``input_attack=None``) use the plain cross-entropy everywhere (supplement, "Flatness of Clean Loss Landscape"). The
loss is cross-entropy, evaluated per example and averaged over the dataset.

Defaults are the paper's: xi = 0.5 with 10 samples and PGD-20 (eps 8/255, step 0.007) for the average case;
xi = 0.003 (the paper's tables; its main-text setup says 0.00075, the code's notebook uses 0.00075 -- pass
``Neighbourhood(xi=0.00075)`` for that; #worst-case-xi), weight lr 0.001 (paper; the code uses 0.01;
#worst-case-lr), 20 iterations and 10 restarts for the worst case; one nu for the whole dataset (the code's, below).
Documented choices where paper and code differ (sections of docs/paper-vs-code.md):

* ``distribution``: ``"ball"`` (paper: nu inside the ball) by default, ``"sphere"`` reproduces the code
  (#nu-distribution). On
  layers with many weights the two coincide (the radius law u**(1/d) is ~1).
* ``nu_per``: ``"dataset"`` (default; the released code, docs/paper-vs-code.md#nu-per): one nu per
  sample/restart for the whole evaluation set, so a sample is one network and the per-sample losses are those of K
  networks. The worst-case nu is updated after every batch, ``steps`` passes over the batches (``steps x
  ceil(N / batch_size)`` ascent steps, 160 for the paper's 1000 images in batches of 128; the last iterate), as the
  code computed the paper's numbers. ``"batch"``: a new nu for every batch of ``batch_size`` examples, the worst-case
  attack running ``steps`` iterations per batch. At the paper's 20 iterations that ascent has not converged and
  gives a lower worst case (2.3% and 5.8% lower than the code's on two ResNet-18s, 25-100x the spread between
  restarts); and an average-case sample then averages over ``ceil(N / batch_size)`` networks, which shrinks the
  spread over samples that the paper reports between networks. The two are different measures: a per-batch nu
  can fit each batch, so with enough iterations ``"batch"`` can end higher on small batches.

Evaluation strategies for the K samples/restarts (``strategy``): ``"loop"`` (a Python loop over one jitted
per-sample function; the default, measured fastest for ResNet-18 on CPU and GPU, see
:func:`default_strategy`), ``"vmap"`` (all K at once; fastest for small models on a GPU) and ``"chunked"`` (vmap
over chunks of ``chunk_size``). All three give the same numbers for the same key (up to float reassociation).

Keys: ``key -> (reference key, units key)``; sample/restart k uses ``fold_in(units key, k)`` and batch b
``fold_in(., b)``, so a run interrupted after some samples and resumed (``done=...``) gives identical numbers.
The last batch is padded to ``batch_size`` (padding masked out of every loss and gradient) so no extra compile.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla
from robust_flat.attacks.common import check_data, cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.batching import padded_batches
from robust_flat.weights import adversarial as wadv
from robust_flat.weights import neighbourhood as nbh
from robust_flat.weights import random as wrandom
from robust_flat.weights.neighbourhood import Neighbourhood
from robust_flat.weights.selection import check_selects_something

STRATEGIES = ("loop", "chunked", "vmap")
NU_PER = ("batch", "dataset")

PAPER_PGD20 = PGDConfig(eps=8 / 255, step_size=0.007, steps=20)
PAPER_REFERENCE = PGDConfig(eps=8 / 255, step_size=0.007, steps=20, restarts=10)


def default_strategy(backend: Optional[str] = None) -> str:
    """``"loop"`` on every backend, from measurements (``benchmarks/flatness_speed.py``):

    * CPU (2-core VM, small CNN, K=4 samples x PGD-20 on 32 images): loop 17.6 s, chunked(2) 32.7 s, vmap 42.7 s --
      vmapping over weights batches the convolutions over weight copies, which XLA:CPU runs slowly (~14x
      slower forwards in an earlier measurement).
    * GPU (one H200, jax 0.11.2, K=10 x PGD-20 on 128 images, medians of 3): ResNet-18 loop 0.464 s, chunked(2)
      0.604 s, chunked(5) 0.532 s, vmap 0.529 s; small CNN loop 0.085 s, chunked(2) 0.079 s, chunked(5) 0.068 s,
      vmap 0.061 s. A ResNet-18 batch of 128 already fills the GPU, so batching weight copies only adds work; the
      small CNN leaves it idle, and ``strategy="vmap"`` is then ~1.4x faster. The loop also needs the least memory
      (XLA's GPU plan for ResNet-18 at batch 128: 5.25 GB for K=10 in one vmap, 1.09 GB for chunks of 2).

    ``backend`` is accepted (and ignored) so callers need not change if a backend ever measures otherwise."""
    del backend
    return "loop"


def _check_common(config, units: str, attack: str, input_attack: Optional[PGDConfig]):
    """The checks both measures' configs share; ``units``: the field counting samples/restarts, ``attack``: the
    name of the input attack's field (``input_attack``: its value)."""
    if getattr(config, units) < 1:
        raise ValueError(f"{units} must be >= 1, got {getattr(config, units)}")
    if (input_attack is None) != (config.reference_attack is None):
        raise ValueError(f"{attack} and reference_attack must both be set (robust loss) or both be None (clean loss)")
    if config.strategy is not None and config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if config.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {config.chunk_size}")
    if config.nu_per not in NU_PER:
        raise ValueError(f"unknown nu_per {config.nu_per!r}; choose dataset (one nu for the whole dataset, the "
                         "default) or batch (a new nu per batch)")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")


@dataclasses.dataclass(frozen=True)
class AverageCaseConfig:
    """Average-case flatness. ``attack=None`` and ``reference_attack=None``: flatness of the clean loss."""

    neighbourhood: Neighbourhood = Neighbourhood(xi=0.5)
    samples: int = 10
    distribution: str = "ball"
    attack: Optional[PGDConfig] = PAPER_PGD20
    reference_attack: Optional[PGDConfig] = PAPER_REFERENCE
    nu_per: str = "dataset"
    batch_size: int = 128
    strategy: Optional[str] = None
    chunk_size: int = 2

    def __post_init__(self):
        _check_common(self, "samples", "attack", self.attack)
        if self.distribution not in wrandom.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; choose one of "
                             f"{', '.join(wrandom.DISTRIBUTIONS)}")

    @property
    def robust(self) -> bool:
        return self.attack is not None

    @property
    def units(self) -> int:
        return self.samples


@dataclasses.dataclass(frozen=True)
class WorstCaseConfig:
    """Worst-case flatness: ``restarts`` runs of the joint attack ``attack`` (its own ``restarts`` must be 1), max of
    the dataset-mean losses. ``attack.input_attack=None`` and ``reference_attack=None``: clean loss."""

    attack: wadv.WeightAttackConfig = wadv.WeightAttackConfig(neighbourhood=Neighbourhood(xi=0.003),
                                                               input_attack=PAPER_PGD20)
    restarts: int = 10
    reference_attack: Optional[PGDConfig] = PAPER_REFERENCE
    nu_per: str = "dataset"
    batch_size: int = 128
    strategy: Optional[str] = None
    chunk_size: int = 2

    def __post_init__(self):
        _check_common(self, "restarts", "attack.input_attack", self.attack.input_attack)
        if self.attack.restarts != 1:
            raise ValueError("WorstCaseConfig.attack.restarts must be 1: restarts are taken over the whole dataset "
                             "(WorstCaseConfig.restarts)")
        if self.nu_per == "dataset" and self.attack.best_iterate != "last":
            raise ValueError("nu_per='dataset' (the code's shared nu) returns the last iterate only")

    @property
    def robust(self) -> bool:
        return self.attack.input_attack is not None

    @property
    def units(self) -> int:
        return self.restarts


@dataclasses.dataclass
class FlatnessResult:
    """``perturbed[k]``: dataset-mean loss of sample/restart k; ``flatness`` = mean (average case) or max (worst
    case) of ``perturbed`` minus ``reference`` (the unperturbed robust/clean loss)."""

    measure: str
    loss: str
    flatness: float
    reference: float
    perturbed: np.ndarray
    perturbed_mean: float
    perturbed_std: float
    perturbed_max: float
    per_example: np.ndarray
    reference_per_example: np.ndarray
    seconds: float = float("nan")
    config: dict = dataclasses.field(default_factory=dict)

    def to_dict(self, per_example: bool = False) -> dict:
        out = {"measure": self.measure, "loss": self.loss, "flatness": self.flatness, "reference": self.reference,
               "perturbed": [float(v) for v in self.perturbed], "perturbed_mean": self.perturbed_mean,
               "perturbed_std": self.perturbed_std, "perturbed_max": self.perturbed_max,
               "n_examples": int(self.reference_per_example.shape[0]), "seconds": self.seconds, "config": self.config}
        if per_example:
            out["per_example"] = self.per_example.tolist()
            out["reference_per_example"] = self.reference_per_example.tolist()
        return out


def config_to_dict(config) -> dict:
    """A JSON-safe dict of a (nested) config dataclass; callables become their names."""
    def conv(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if callable(v):
            return getattr(v, "__name__", repr(v))
        return v
    return conv(config)


def num_batches(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / min(batch_size, n_examples))


def total_work(config, n_examples: int, include_reference: bool = True) -> int:
    """Progress units (one per sample/restart per batch per pass; plus one per reference batch)."""
    nb = num_batches(n_examples, config.batch_size)
    passes = 1
    if isinstance(config, WorstCaseConfig) and config.nu_per == "dataset":
        passes = config.attack.steps + 1
    return config.units * nb * passes + (nb * _reference_runs(config.reference_attack)[1] if include_reference else 0)


# ------------------------------------------------------------------------------------------------ keys
def _unit_keys(key, unit, b):
    """(dataset-level nu key of the unit, per-batch key of the unit)."""
    k_unit = jax.random.fold_in(key, unit)
    k_nu, k_rest = jax.random.split(k_unit)
    return k_nu, jax.random.fold_in(k_rest, b)


def split_key(key):
    """``key -> (reference key, units key)``."""
    k_ref, k_units = jax.random.split(key)
    return k_ref, k_units


# ------------------------------------------------------------------------------------------------ reference
def _robust_losses(logits_fn, attack, params, model_state, key, x, y):
    """Per-example CE of the network ``params`` at its PGD adversarial examples (``attack``), or at ``x`` (``None``).

    One compiled program serves the reference loss (one call per restart) and every weight sample of the average
    case (``attack`` equal to the reference's one-restart PGD, the paper's default), so PGD-20 compiles once."""
    fn = lambda xx: logits_fn(params, model_state, xx)  # noqa: E731
    if attack is not None:
        x = pgd.raw(fn, x, y, key, attack)
    return cross_entropy(fn(x), y)


_robust_losses_jit = xla.jit(_robust_losses, static_argnames=("logits_fn", "attack"))
_reference_key_jit = jax.jit(lambda key, b, r: jax.random.fold_in(jax.random.fold_in(key, b), r))


def _reference_runs(attack: Optional[PGDConfig]) -> tuple[Optional[PGDConfig], int]:
    """(attack per call, number of calls). With the paper's per-example restart selection by loss, restarts run as
    separate calls of a one-restart PGD and the per-example max CE is taken here: the same selection, a tenth of the
    compile time and memory. The code's ``"confidence"`` selection (or a non-CE attack loss) runs inside PGD."""
    if attack is None or attack.restarts == 1:
        return attack, 1
    if attack.restart_selection == "loss" and attack.loss == "ce":
        return dataclasses.replace(attack, restarts=1), attack.restarts
    return attack, 1


def reference_losses(logits_fn, params, model_state, x, y, key, attack: Optional[PGDConfig] = PAPER_REFERENCE,
                     batch_size: int = 128, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Per-example reference loss: CE at the PGD adversarial example, worst of ``attack.restarts`` per example, or the
    clean CE (``attack=None``). ``key`` is used as given (the measures pass the first half of :func:`split_key`)."""
    x, y = check_data(x, y, None if attack is None else attack.eps, "flatness")
    per_call, runs = _reference_runs(attack)
    out = []
    for b, batch in enumerate(padded_batches(x, y, batch_size)):
        best = None
        for r in range(runs):
            k = _reference_key_jit(key, b, r)
            losses = np.asarray(_robust_losses_jit(logits_fn, per_call, params, model_state, k, batch.x,
                                                   batch.y))[:batch.n_valid]
            best = losses if best is None else np.maximum(best, losses)
            if progress:
                progress(1)
        out.append(best)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ unit functions
def _avg_unit_weights(config: AverageCaseConfig, vectorize, xi, params, key, units, b):
    """``(w + nu, input-attack key)`` of each unit for batch ``b``, stacked over ``units`` when ``vectorize``.

    Deliberately a program of its own, separate from the attack on those weights: compiled together, XLA:CPU fused
    the sampler's elementwise tail (the inverse-CDF polynomial of the Gaussians, the scaling) into every consumer of
    the perturbed weights, so each bias broadcast recomputed it per activation element in each of PGD-20's 41
    passes (+9% time per sample on the small CNN; ``lax.optimization_barrier`` does not survive XLA:CPU's pipeline)."""
    config = _traced_xi(config, xi)
    nb = config.neighbourhood

    def one(unit):
        k_nu_ds, k_b = _unit_keys(key, unit, b)
        k_nu_b, k_in = jax.random.split(k_b)
        k_nu = k_nu_b if config.nu_per == "batch" else k_nu_ds
        return nbh.perturb(params, wrandom.sample(k_nu, params, nb, config.distribution), nb), k_in

    return jax.vmap(one)(units) if vectorize else one(units[0])


def _avg_unit_losses(logits_fn, attack, weights, model_state, keys, x, y):
    """:func:`_robust_losses` vmapped over stacked weights and keys (the ``vmap``/``chunked`` strategies)."""
    return jax.vmap(lambda w, k: _robust_losses(logits_fn, attack, w, model_state, k, x, y))(weights, keys)


_avg_unit_weights_jit = xla.jit(_avg_unit_weights, static_argnames=("config", "vectorize"))
_avg_unit_losses_jit = xla.jit(_avg_unit_losses, static_argnames=("logits_fn", "attack"))


def _worst_unit_batch(logits_fn, config: WorstCaseConfig, params, model_state, key, unit, b, x, y, mask):
    _, k_b = _unit_keys(key, unit, b)
    nu, x_adv = wadv.weight_attack.raw(logits_fn, params, model_state, x, y, k_b, config.attack, mask)
    return cross_entropy(logits_fn(nbh.perturb(params, nu, config.attack.neighbourhood), model_state, x_adv), y)


def _static_config(config):
    """``(config with xi and the driver-only fields neutralized, xi as an array)``: the jitted unit functions take the
    former as a static argument and xi traced, so a sweep over xi, strategies or sample counts compiles once."""
    nb = config.neighbourhood if isinstance(config, AverageCaseConfig) else config.attack.neighbourhood
    xi = jnp.asarray(nb.xi, jnp.float32)
    neutral = dataclasses.replace(nb, xi=0.0)
    common = dict(strategy=None, chunk_size=1, batch_size=1)
    if isinstance(config, AverageCaseConfig):
        return dataclasses.replace(config, neighbourhood=neutral, samples=1, **common), xi
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, neighbourhood=neutral), restarts=1,
                               **common), xi


def _traced_xi(config, xi):
    """Inverse of :func:`_static_config` inside traced code."""
    if isinstance(config, AverageCaseConfig):
        return dataclasses.replace(config, neighbourhood=dataclasses.replace(config.neighbourhood, xi=xi))
    nb = dataclasses.replace(config.attack.neighbourhood, xi=xi)
    return dataclasses.replace(config, attack=dataclasses.replace(config.attack, neighbourhood=nb))


def _map_units(fn, vectorize, params, model_state, key, units, *rest):
    if vectorize:
        return jax.vmap(fn, in_axes=(None, None, None, 0) + (None,) * len(rest))(params, model_state, key, units,
                                                                                  *rest)
    return fn(params, model_state, key, units[0], *rest)[None]


def _worst_units(logits_fn, config, vectorize, xi, params, model_state, key, units, b, x, y, mask):
    config = _traced_xi(config, xi)
    return _map_units(functools.partial(_worst_unit_batch, logits_fn, config), vectorize, params, model_state, key,
                      units, b, x, y, mask)


_STATIC = ("logits_fn", "config", "vectorize")
_worst_units_jit = xla.jit(_worst_units, static_argnames=_STATIC)


# --- worst case with one nu shared by all batches (the code): init / step / evaluate, each over a chunk of units
def _ds_init_nu(config: WorstCaseConfig, vectorize, xi, params, key, units):
    config = _traced_xi(config, xi)

    def one(unit):
        return wadv.init_nu(params, _unit_keys(key, unit, 0)[0], config.attack)
    return jax.vmap(one)(units) if vectorize else jax.tree.map(lambda a: a[None], one(units[0]))


def _ds_init_delta(config: WorstCaseConfig, vectorize, key, units, b, x):
    def one(unit):
        return wadv.init_input(x, _unit_keys(key, unit, b)[1], config.attack)
    return jax.vmap(one)(units) if vectorize else one(units[0])[None]


def _ds_step(logits_fn, config: WorstCaseConfig, vectorize, xi, params, model_state, nu, delta, x, y, mask):
    config = _traced_xi(config, xi)

    def one(nu, delta):
        nu, delta, _ = wadv.step(logits_fn, params, model_state, nu, x, delta, y, mask, config.attack)
        return nu, delta
    if vectorize:
        return jax.vmap(one)(nu, delta)
    nu1, d1 = one(jax.tree.map(lambda a: a[0], nu), None if delta is None else delta[0])
    return jax.tree.map(lambda a: a[None], nu1), None if d1 is None else d1[None]


def _ds_eval(logits_fn, config: WorstCaseConfig, vectorize, params, model_state, nu, delta, x, y):
    nb = config.attack.neighbourhood

    def one(nu, delta):
        xin = x if delta is None else x + delta
        return cross_entropy(logits_fn(nbh.perturb(params, nu, nb), model_state, xin), y)
    if vectorize:
        return jax.vmap(one)(nu, delta)
    return one(jax.tree.map(lambda a: a[0], nu), None if delta is None else delta[0])[None]


_ds_init_nu_jit = xla.jit(_ds_init_nu, static_argnames=("config", "vectorize"))
_ds_init_delta_jit = xla.jit(_ds_init_delta, static_argnames=("config", "vectorize"))
_ds_step_jit = xla.jit(_ds_step, static_argnames=_STATIC)
_ds_eval_jit = xla.jit(_ds_eval, static_argnames=_STATIC)


# ------------------------------------------------------------------------------------------------ driver
def _chunks(todo: list[int], strategy: str, chunk_size: int):
    size = {"loop": 1, "chunked": chunk_size, "vmap": max(len(todo), 1)}[strategy]
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        yield chunk, jnp.asarray(chunk + [chunk[-1]] * (size - len(chunk)), jnp.int32), strategy != "loop"


def _run_units(chunk_fn, n_units, strategy, chunk_size, done, on_unit):
    results = {int(k): np.asarray(v) for k, v in (done or {}).items() if 0 <= int(k) < n_units}
    todo = [k for k in range(n_units) if k not in results]
    for chunk, ids, vectorize in _chunks(todo, strategy, chunk_size):
        losses = chunk_fn(ids, vectorize, len(chunk))  # [len(ids), N]; rows past len(chunk) are padding
        for i, k in enumerate(chunk):
            results[k] = losses[i]
            if on_unit is not None:
                on_unit(k, losses[i])
    return np.stack([results[k] for k in range(n_units)])


def _per_batch_chunk(jitted, logits_fn, config, xi, params, model_state, key, batches, progress):
    def chunk_fn(ids, vectorize, n_real):
        out = []
        for b, batch in enumerate(batches):
            losses = jitted(logits_fn, config, vectorize, xi, params, model_state, key, ids, b, batch.x, batch.y,
                            batch.mask)
            out.append(np.asarray(losses)[:, :batch.n_valid])
            if progress:
                progress(n_real)
        return np.concatenate(out, axis=1)
    return chunk_fn


def _avg_chunk(logits_fn, config, xi, params, model_state, key, batches, progress):
    def chunk_fn(ids, vectorize, n_real):
        out = []
        for b, batch in enumerate(batches):
            weights, keys = _avg_unit_weights_jit(config, vectorize, xi, params, key, ids, b)
            if vectorize:
                losses = np.asarray(_avg_unit_losses_jit(logits_fn, config.attack, weights, model_state, keys,
                                                         batch.x, batch.y))
            else:  # the reference's program
                losses = np.asarray(_robust_losses_jit(logits_fn, config.attack, weights, model_state, keys, batch.x,
                                                       batch.y))[None]
            out.append(losses[:, :batch.n_valid])
            if progress:
                progress(n_real)
        return np.concatenate(out, axis=1)
    return chunk_fn


def _shared_nu_chunk(logits_fn, config: WorstCaseConfig, steps, xi, params, model_state, key, batches, progress):
    """One nu per unit for all batches, updated after every batch, ``steps`` passes (``config.attack.steps`` is 0
    here, so that iteration counts share the compiled programs)."""
    robust = config.robust

    def chunk_fn(ids, vectorize, n):
        nu = _ds_init_nu_jit(config, vectorize, xi, params, key, ids)
        deltas = [(_ds_init_delta_jit(config, vectorize, key, ids, b, batch.x) if robust else None)
                  for b, batch in enumerate(batches)]
        for _ in range(steps):
            for b, batch in enumerate(batches):
                nu, deltas[b] = _ds_step_jit(logits_fn, config, vectorize, xi, params, model_state, nu, deltas[b],
                                             batch.x, batch.y, batch.mask)
                if progress:
                    progress(n)
        out = []
        for b, batch in enumerate(batches):
            losses = _ds_eval_jit(logits_fn, config, vectorize, params, model_state, nu, deltas[b], batch.x, batch.y)
            out.append(np.asarray(losses)[:, :batch.n_valid])
            if progress:
                progress(n)
        return np.concatenate(out, axis=1)
    return chunk_fn


def _measure(kind, logits_fn, params, model_state, x, y, key, config, *, done, on_unit, reference, on_reference,
             progress) -> FlatnessResult:
    t0 = time.perf_counter()
    if isinstance(config, AverageCaseConfig):
        nb, eps = config.neighbourhood, (config.attack.eps if config.attack is not None else None)
    else:
        nb = config.attack.neighbourhood
        eps = config.attack.input_attack.eps if config.attack.input_attack is not None else None
    x, y = check_data(x, y, eps, "flatness")
    check_selects_something(params, nb.selection)
    strategy = config.strategy or default_strategy()
    k_ref, k_units = split_key(key)
    batches = list(padded_batches(x, y, config.batch_size))

    if reference is None:
        reference = reference_losses(logits_fn, params, model_state, x, y, k_ref, config.reference_attack,
                                     config.batch_size, progress)
        if on_reference is not None:
            on_reference(reference)
    reference = np.asarray(reference, np.float64)
    if reference.shape != (x.shape[0],):
        raise ValueError(f"reference must have shape ({x.shape[0]},), got {reference.shape}")

    static, xi = _static_config(config)
    if kind == "average":
        chunk_fn = _avg_chunk(logits_fn, static, xi, params, model_state, k_units, batches, progress)
    elif config.nu_per == "batch":
        chunk_fn = _per_batch_chunk(_worst_units_jit, logits_fn, static, xi, params, model_state, k_units, batches,
                                    progress)
    else:
        # its programs run one step each (the passes loop here): the iteration count would only recompile them
        static = dataclasses.replace(static, attack=dataclasses.replace(static.attack, steps=0))
        chunk_fn = _shared_nu_chunk(logits_fn, static, config.attack.steps, xi, params, model_state, k_units,
                                    batches, progress)
    per_example = _run_units(chunk_fn, config.units, strategy, config.chunk_size, done, on_unit).astype(np.float64)

    perturbed = per_example.mean(axis=1)
    ref = float(reference.mean())
    top = float(perturbed.mean()) if kind == "average" else float(perturbed.max())
    cfg = config_to_dict(config)
    cfg["strategy"] = strategy
    return FlatnessResult(measure=kind, loss="robust" if config.robust else "clean", flatness=top - ref,
                          reference=ref, perturbed=perturbed, perturbed_mean=float(perturbed.mean()),
                          perturbed_std=float(perturbed.std()), perturbed_max=float(perturbed.max()),
                          per_example=per_example, reference_per_example=reference,
                          seconds=time.perf_counter() - t0, config=cfg)


def average_case(logits_fn, params, model_state, x, y, key, config: AverageCaseConfig = AverageCaseConfig(), *,
                 done: Optional[dict] = None, on_unit: Optional[Callable[[int, np.ndarray], Any]] = None,
                 reference: Optional[np.ndarray] = None, on_reference: Optional[Callable[[np.ndarray], Any]] = None,
                 progress: Optional[Callable[[int], None]] = None) -> FlatnessResult:
    """Average-case flatness over the dataset ``(x [N, H, W, C] in [0, 1], y [N])``.

    Resumption: ``done`` maps finished sample indices to their per-example losses (those samples are skipped),
    ``on_unit(k, losses)`` is called after each sample, ``reference``/``on_reference`` do the same for the reference
    loss. ``progress(n)`` is called after every batch of work (see :func:`total_work`)."""
    return _measure("average", logits_fn, params, model_state, x, y, key, config, done=done, on_unit=on_unit,
                    reference=reference, on_reference=on_reference, progress=progress)


def worst_case(logits_fn, params, model_state, x, y, key, config: WorstCaseConfig = WorstCaseConfig(), *,
               done: Optional[dict] = None, on_unit: Optional[Callable[[int, np.ndarray], Any]] = None,
               reference: Optional[np.ndarray] = None, on_reference: Optional[Callable[[np.ndarray], Any]] = None,
               progress: Optional[Callable[[int], None]] = None) -> FlatnessResult:
    """Worst-case flatness (joint weight+input attack; weights only for the clean loss). Arguments as
    :func:`average_case`; a unit is one restart."""
    return _measure("worst", logits_fn, params, model_state, x, y, key, config, done=done, on_unit=on_unit,
                    reference=reference, on_reference=on_reference, progress=progress)


# Presets: the paper's four measures (robust/clean x average/worst).
PAPER_CONFIGS = {
    "avg": AverageCaseConfig(),
    "worst": WorstCaseConfig(),
    "clean_avg": AverageCaseConfig(attack=None, reference_attack=None),
    "clean_worst": WorstCaseConfig(attack=wadv.WeightAttackConfig(neighbourhood=Neighbourhood(xi=0.003)),
                                   reference_attack=None),
}
