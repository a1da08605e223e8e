"""EKI for machine learning against gradient descent (Kovachki & Stuart 2019).

Two experiments, on data shipped with scikit-learn and statsmodels (no download):

1. **Digits classification** (``sklearn.datasets.load_digits``, 8×8 images, 10 classes;
   a fixed split of 1347 training and 450 test images). Dense tanh networks with 1, 2
   and 3 hidden layers of 32 units, trained with the cross-entropy on logits, batch
   100, for the same number of epochs by

   - SGD and momentum SGD (optax; learning rate picked from a small grid on a
     validation split of the training set),
   - EKI, EKI(R) (re-spreading once per epoch at γ = 1), MEKI (Nesterov momentum) and
     MEKI(R), with J members and the package defaults h = 1, ε = 1e-8, reporting the
     test accuracy of the mean particle ū and of the best particle u^(j*) (lowest
     training loss).

   Matched *epochs* (every method sees each training image equally often; EKI evaluates
   the network J times per image, reported as network evaluations) and matched *wall
   time* (each EKI variant's test accuracy after the epochs it finished within momentum
   SGD's full training time; compilation excluded for every method).

2. **Sunspots online regression** (``statsmodels.datasets.sunspots``, yearly 1700–2008,
   scaled to [0, 1]): a 5-lag MLP (5–10–1, tanh) updated once per new year, in time
   order, by EKI (J members, squared error, h = 1) and by online gradient descent (OGD,
   learning rate picked from a grid by final loss). "First" is the MSE over the whole
   series after one pass, "prequential" the mean loss of one-step-ahead predictions made
   during the first pass before each update, "final" the MSE after all passes.

Run from the repository root::

    python benchmarks/ml_training.py            # full run (a few minutes on 2 cores)
    python benchmarks/ml_training.py --quick    # smoke test

Writes ``benchmarks/results/ml_training.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits
from statsmodels.datasets import sunspots

from eki_infer.ml import (
    OnlineEKI,
    eki_ml,
    ensemble_forward,
    fit,
    glorot_scale,
    member_losses,
    respread_schedule,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_ACCURACY = 0.95

# The seed's reported MNIST test accuracies (J = 2000, dense networks DNN 1–4).
PAPER_MNIST = {
    "SGD": "0.920–0.982",
    "MSGD": "0.926–0.984",
    "EKI": "0.909–0.943 (ū)",
    "EKI(R)": "0.925–0.974 (ū)",
    "MEKI": "0.909–0.932 (ū, DNN 1–2)",
    "MEKI(R)": "0.914–0.951 (ū, DNN 1–2)",
}
PAPER_SUNSPOTS = {"OGD": (4.939e-2, 6.480e-3), "EKI": (8.671e-3, 6.006e-3)}


# ------------------------------------------------------------------------ networks


def mlp_init(key, sizes):
    params = []
    for n_in, n_out in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (n_in, n_out)) * np.sqrt(2.0 / (n_in + n_out))
        params.append({"w": w, "b": jnp.zeros(n_out)})
    return params


def mlp_apply(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


def mean_cross_entropy(params, x, y):
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(mlp_apply(params, x)), axis=-1))


def accuracy(params, x, labels):
    return float(jnp.mean(jnp.argmax(mlp_apply(params, x), axis=-1) == labels))


# -------------------------------------------------------------------- digits: data


def digits_data():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    train, test = perm[:1347], perm[1347:]
    return (
        jnp.asarray(x[train]),
        jnp.asarray(labels[train]),
        jnp.asarray(x[test]),
        jnp.asarray(labels[test]),
    )


# ------------------------------------------------------------------ digits: gradients


_SGD_CACHE: dict = {}


def sgd_epoch_fn(optimizer, n, batch):
    key = (optimizer, n, batch)  # the key keeps the optimiser alive (no id reuse)
    if key not in _SGD_CACHE:

        @jax.jit
        def run_epoch(rng, params, opt_state, x, y):
            idx = jax.random.permutation(rng, n)[: (n // batch) * batch].reshape(-1, batch)

            def body(carry, i):
                params, opt_state = carry
                grads = jax.grad(mean_cross_entropy)(params, x[i], y[i])
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), idx)
            return params, opt_state

        _SGD_CACHE[key] = run_epoch
    return _SGD_CACHE[key]


def train_sgd(seed, sizes, optimizer, x, labels, x_eval, l_eval, epochs, batch):
    y = jax.nn.one_hot(labels, 10)
    params = mlp_init(jax.random.PRNGKey(seed), sizes)
    opt_state = optimizer.init(params)
    run_epoch = sgd_epoch_fn(optimizer, x.shape[0], batch)
    # compile outside the clock
    jax.block_until_ready(run_epoch(jax.random.PRNGKey(0), params, opt_state, x, y))
    acc, times, elapsed = [], [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        params, opt_state = run_epoch(
            jax.random.PRNGKey(1000 * seed + epoch), params, opt_state, x, y
        )
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        times.append(elapsed)
        acc.append(accuracy(params, x_eval, l_eval))
    return {"acc": acc, "time": times}


def pick_learning_rate(sizes, make, grid, x, labels, epochs, batch):
    """Best learning rate on a validation split (last 20 % of the training set)."""
    cut = int(0.8 * x.shape[0])
    scores = {}
    for lr in grid:
        res = train_sgd(
            99, sizes, make(lr), x[:cut], labels[:cut], x[cut:], labels[cut:], epochs, batch
        )
        scores[lr] = float(np.mean(res["acc"][-3:]))
    return max(scores, key=scores.get), scores


# ------------------------------------------------------------------------ digits: EKI


EKI_VARIANTS = {
    "EKI": {},
    "EKI(R)": {"respread": True},
    "MEKI": {"momentum": "nesterov"},
    "MEKI(R)": {"momentum": "nesterov", "respread": True},
}


def train_eki(seed, sizes, variant, x, labels, x_test, l_test, epochs, batch, ensemble, cache):
    y = jax.nn.one_hot(labels, 10)
    template = mlp_init(jax.random.PRNGKey(seed), sizes)
    flat, unravel = ravel_pytree(template)
    scale = glorot_scale(template, bias_scale=0.1)
    key = (tuple(sizes), variant)
    if key not in cache:  # one kernel and forward map per (network, variant): compile once
        opts = EKI_VARIANTS[variant]
        respread = (
            respread_schedule(1.0, every=x.shape[0] // batch) if opts.get("respread") else None
        )
        kernel = eki_ml(
            "cross_entropy_logits",
            momentum=opts.get("momentum"),
            respread=respread,
            prior_scale=scale,
        )
        cache[key] = (kernel, ensemble_forward(mlp_apply, unravel))
    kernel, forward = cache[key]
    particles = flat + scale * jax.random.normal(
        jax.random.PRNGKey(10_000 + seed), (ensemble, flat.size)
    )
    fit(jax.random.PRNGKey(0), kernel, forward, particles, x, y, epochs=1, batch_size=batch)

    def on_epoch(epoch, state):
        return {"acc": accuracy(unravel(jnp.mean(state.particles, axis=0)), x_test, l_test)}

    result = fit(
        jax.random.PRNGKey(seed),
        kernel,
        forward,
        particles,
        x,
        y,
        epochs=epochs,
        batch_size=batch,
        on_epoch=on_epoch,
    )
    final = result.state.particles
    best = int(jnp.argmin(member_losses("cross_entropy_logits", forward(final, x), y)))
    return {
        "acc": result.history["acc"],
        "time": result.history["wall_time"],
        "acc_best": accuracy(unravel(final[best]), x_test, l_test),
        "evaluations_per_example": ensemble * epochs,
    }


def time_to(run, target):
    hit = [t for a, t in zip(run["acc"], run["time"], strict=True) if a >= target]
    return hit[0] if hit else None


def acc_at_time(run, budget):
    done = [a for a, t in zip(run["acc"], run["time"], strict=True) if t <= budget]
    return (done[-1], len(done)) if done else (float("nan"), 0)


def digits_benchmark(seeds, epochs, ensemble, batch, quick):
    x, labels, x_test, l_test = digits_data()
    archs = {"DNN-1": [32], "DNN-2": [32, 32], "DNN-3": [32, 32, 32]}
    if quick:
        archs = {"DNN-1": [32]}
    out = {}
    cache: dict = {}
    for name, hidden in archs.items():
        sizes = [64, *hidden, 10]
        d = int(ravel_pytree(mlp_init(jax.random.PRNGKey(0), sizes))[0].size)
        print(f"[digits] {name}: d = {d}", flush=True)
        arch = {"d": d, "methods": {}}
        sgd_lr, sgd_scores = pick_learning_rate(
            sizes, optax.sgd, (0.1, 0.3, 1.0, 3.0), x, labels, epochs, batch
        )
        msgd_lr, msgd_scores = pick_learning_rate(
            sizes,
            lambda lr: optax.sgd(lr, momentum=0.9),
            (0.01, 0.03, 0.1),
            x,
            labels,
            epochs,
            batch,
        )
        arch["learning_rates"] = {"SGD": sgd_lr, "MSGD": msgd_lr}
        arch["validation"] = {"SGD": sgd_scores, "MSGD": msgd_scores}
        optimisers = {"SGD": optax.sgd(sgd_lr), "MSGD": optax.sgd(msgd_lr, momentum=0.9)}
        for method, opt in optimisers.items():
            runs = [
                train_sgd(s, sizes, opt, x, labels, x_test, l_test, epochs, batch) for s in seeds
            ]
            for r in runs:
                r["evaluations_per_example"] = epochs
            arch["methods"][method] = runs
        for variant in EKI_VARIANTS:
            t0 = time.perf_counter()
            arch["methods"][variant] = [
                train_eki(
                    s, sizes, variant, x, labels, x_test, l_test, epochs, batch, ensemble, cache
                )
                for s in seeds
            ]
            print(f"  {variant}: {time.perf_counter() - t0:.1f} s", flush=True)
        budget = float(np.mean([r["time"][-1] for r in arch["methods"]["MSGD"]]))
        arch["time_budget"] = budget
        for runs in arch["methods"].values():
            for r in runs:
                r["acc_at_budget"], r["epochs_at_budget"] = acc_at_time(r, budget)
                r["time_to_target"] = time_to(r, TARGET_ACCURACY)
        out[name] = arch
    return out


# ----------------------------------------------------------------------- sunspots


LAGS, HIDDEN = 5, 10


def sunspot_data():
    s = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    s = (s / s.max()).astype(np.float32)
    x = np.stack([s[i : i + LAGS] for i in range(len(s) - LAGS)])
    return jnp.asarray(x), jnp.asarray(s[LAGS:])


def sun_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (LAGS, HIDDEN)) * np.sqrt(2.0 / (LAGS + HIDDEN)),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 1)) * np.sqrt(2.0 / (HIDDEN + 1)),
        "b2": jnp.zeros(1),
    }


def sun_apply(params, x):
    return (jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"])[..., 0]


def mse(z, y):
    return jnp.mean((z - y) ** 2)


def ogd_run(seed, lr, x, y, passes):
    params = sun_init(jax.random.PRNGKey(seed))
    xs, ys = x[:, None, :], y[:, None]

    @jax.jit
    def one_pass(params):
        def body(params, xy):
            before = mse(sun_apply(params, xy[0]), xy[1])
            grads = jax.grad(lambda p: mse(sun_apply(p, xy[0]), xy[1]))(params)
            return jax.tree_util.tree_map(lambda a, g: a - lr * g, params, grads), before

        return jax.lax.scan(body, params, (xs, ys))

    losses, prequential = [], None
    for k in range(passes):
        params, before = one_pass(params)
        if k == 0:
            prequential = float(jnp.mean(before))
        losses.append(float(mse(sun_apply(params, x), y)))
    return {"loss": losses, "prequential": prequential}


def eki_online_run(seed, x, y, passes, ensemble):
    template = sun_init(jax.random.PRNGKey(seed))
    flat, unravel = ravel_pytree(template)
    scale = glorot_scale(template, bias_scale=0.1)
    particles = flat + scale * jax.random.normal(
        jax.random.PRNGKey(10_000 + seed), (ensemble, flat.size)
    )
    kernel = eki_ml(mse, prior_scale=scale)
    online = OnlineEKI(
        kernel, ensemble_forward(sun_apply, unravel), particles, jax.random.PRNGKey(seed), mse
    )
    xs, ys = x[:, None, :], y[:, None]
    losses, prequential = [], None
    for k in range(passes):
        before = online.update_many(xs, ys)
        if k == 0:
            prequential = float(np.mean(before))
        mean = unravel(jnp.mean(online.particles, axis=0))
        losses.append(float(mse(sun_apply(mean, x), y)))
    return {"loss": losses, "prequential": prequential}


def sunspot_benchmark(seeds, passes, ensemble):
    x, y = sunspot_data()
    print(f"[sunspots] {x.shape[0]} examples, passes = {passes}", flush=True)
    grid = (0.01, 0.03, 0.1, 0.3)
    ogd_all = {lr: [ogd_run(s, lr, x, y, passes) for s in seeds] for lr in grid}
    best_lr = min(grid, key=lambda lr: np.mean([r["loss"][-1] for r in ogd_all[lr]]))
    eki = [eki_online_run(s, x, y, passes, ensemble) for s in seeds]
    ogd_final = float(np.mean([r["loss"][-1] for r in ogd_all[best_lr]]))
    for r in eki:  # examples EKI needed to reach OGD's final loss (pass granularity)
        hit = [k for k, v in enumerate(r["loss"]) if v <= ogd_final]
        r["examples_to_ogd_final"] = (hit[0] + 1) * int(x.shape[0]) if hit else None
    return {
        "examples": int(x.shape[0]),
        "d": int(ravel_pytree(sun_init(jax.random.PRNGKey(0)))[0].size),
        "ogd_learning_rate": best_lr,
        "ogd_grid_final": {
            str(lr): float(np.mean([r["loss"][-1] for r in ogd_all[lr]])) for lr in grid
        },
        "OGD": ogd_all[best_lr],
        "EKI": eki,
    }


# --------------------------------------------------------------------------- report


def ms(values, fmt="{:.3f}"):
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{fmt.format(values.mean())} ± {fmt.format(sd)}"


def report(config, digits, sun, total):
    lines = [
        "# EKI for machine learning: digits and sunspots",
        "",
        f"Generated by `benchmarks/ml_training.py` in {total:.0f} s on {config['machine']} "
        f"(JAX {jax.__version__}, CPU, float32). Seeds: {config['seeds']}; mean ± sd over "
        "seeds (the digits split is fixed; seeds change initialisation, batches and "
        "re-spreading draws).",
        "",
        "## Digits (scikit-learn, 1347 train / 450 test)",
        "",
        f"Dense tanh networks, hidden width 32, cross-entropy on logits, batch "
        f"{config['batch']}, {config['epochs']} epochs for every method. EKI variants: "
        f"J = {config['ensemble']}, h = 1, ε = 1e-8, γ = 1 re-spreading at the start of "
        "every epoch after the first for the (R) variants (which also restarts the "
        "momentum), Nesterov λ_k = (k−1)/(k+2) for MEKI. SGD/MSGD learning rates "
        "from a grid on a validation split (MSGD momentum 0.9).",
        "",
        "### Test accuracy at matched epochs",
        "",
    ]
    archs = list(digits)
    header = "| method | " + " | ".join(f"{a} (d = {digits[a]['d']})" for a in archs)
    lines += [header + " | network evaluations per example | seed's MNIST (J = 2000) |"]
    lines += ["|---" * (len(archs) + 3) + "|"]
    for method in ("SGD", "MSGD", *EKI_VARIANTS):
        cells = [ms([r["acc"][-1] for r in digits[a]["methods"][method]]) for a in archs]
        label = method if method in ("SGD", "MSGD") else f"{method} ū"
        evals = digits[archs[0]]["methods"][method][0]["evaluations_per_example"]
        evals_txt = f"{evals} (+ backward)" if method in ("SGD", "MSGD") else str(evals)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {evals_txt} | {PAPER_MNIST[method]} |"
        )
        if method not in ("SGD", "MSGD"):
            cells = [ms([r["acc_best"] for r in digits[a]["methods"][method]]) for a in archs]
            lines.append(f"| {method} u^(j*) | " + " | ".join(cells) + " | | |")
    lines += [
        "",
        "Learning rates (validation): "
        + "; ".join(
            f"{a}: SGD {digits[a]['learning_rates']['SGD']}, "
            f"MSGD {digits[a]['learning_rates']['MSGD']}"
            for a in archs
        )
        + ".",
        "",
    ]
    gaps = {
        a: float(
            np.mean([r["acc"][-1] for r in digits[a]["methods"]["MSGD"]])
            - np.mean([r["acc"][-1] for r in digits[a]["methods"]["EKI(R)"]])
        )
        for a in archs
    }
    met = [a for a, g in gaps.items() if g <= 0.02]
    lines += [
        "Target (EKI(R) within 2 percentage points of momentum SGD for at least one "
        "architecture): gap MSGD − EKI(R) = "
        + ", ".join(f"{a} {100 * g:+.1f} pp" for a, g in gaps.items())
        + " → "
        + ("**met** (" + ", ".join(met) + ")." if met else "**missed**."),
        "",
        "### Matched wall time",
        "",
        "Training time for all epochs (compilation and evaluation excluded), the time "
        f"to first reach {TARGET_ACCURACY} test accuracy (at an epoch's end; mean over "
        "the seeds that reached it), and the test accuracy each method had reached "
        "within momentum SGD's full training time (epochs finished in brackets). "
        "Timings were taken on a shared 2-core machine under other load and vary by "
        "tens of per cent between runs; the ratios between SGD and EKI are what matter.",
        "",
        "| method | "
        + " | ".join(f"{a} time (s)" for a in archs)
        + " | "
        + " | ".join(f"{a} time to {TARGET_ACCURACY} (s)" for a in archs)
        + " | "
        + " | ".join(f"{a} acc. at MSGD's time" for a in archs)
        + " |",
        "|---" * (3 * len(archs) + 1) + "|",
    ]
    for method in ("SGD", "MSGD", *EKI_VARIANTS):
        times = [ms([r["time"][-1] for r in digits[a]["methods"][method]], "{:.3f}") for a in archs]
        accs = []
        for a in archs:
            runs = digits[a]["methods"][method]
            vals = [r["acc_at_budget"] for r in runs]
            eps = int(np.min([r["epochs_at_budget"] for r in runs]))
            if np.all(np.isfinite(vals)):
                accs.append(f"{ms(vals)} ({eps})")
            else:
                accs.append("< 1 epoch done")
        reach = []
        for a in archs:
            hits = [r["time_to_target"] for r in digits[a]["methods"][method]]
            ok = [h for h in hits if h is not None]
            if not ok:
                reach.append("not reached")
            else:
                note = "" if len(ok) == len(hits) else f" ({len(ok)}/{len(hits)} seeds)"
                reach.append(f"{np.mean(ok):.3f}{note}")
        lines.append(
            f"| {method} | "
            + " | ".join(times)
            + " | "
            + " | ".join(reach)
            + " | "
            + " | ".join(accs)
            + " |"
        )
    lines += [
        "",
        "## Sunspots online regression (statsmodels, yearly 1700–2008)",
        "",
        f"{sun['examples']} lagged examples (5 lags → next year, scaled by the maximum), "
        f"MLP 5–10–1 tanh (d = {sun['d']}), one update per new year in time order, "
        f"{config['passes']} passes. EKI: J = {config['sun_ensemble']}, squared error, h = 1. "
        f"OGD: learning rate {sun['ogd_learning_rate']} (best final loss over "
        f"{', '.join(sun['ogd_grid_final'])}).",
        "",
        "| method | first pass MSE | prequential MSE (first pass) | final MSE "
        "| seed (LSTM): first / final |",
        "|---|---|---|---|---|",
    ]
    for method in ("OGD", "EKI"):
        runs = sun[method]
        first = ms([r["loss"][0] for r in runs], "{:.2e}")
        preq = ms([r["prequential"] for r in runs], "{:.2e}")
        final = ms([r["loss"][-1] for r in runs], "{:.2e}")
        paper = "{:.2e} / {:.2e}".format(*PAPER_SUNSPOTS[method])
        lines.append(f"| {method} | {first} | {preq} | {final} | {paper} |")
    ogd_first = np.mean([r["loss"][0] for r in sun["OGD"]])
    eki_first = np.mean([r["loss"][0] for r in sun["EKI"]])
    hits = [r["examples_to_ogd_final"] for r in sun["EKI"]]
    lines += [
        "",
        "Target (EKI's first-pass loss below OGD's): "
        + (
            f"**met** ({eki_first:.2e} < {ogd_first:.2e})."
            if eki_first < ogd_first
            else f"**missed** ({eki_first:.2e} ≥ {ogd_first:.2e})."
        ),
        f"Examples EKI needed to reach OGD's final loss after {config['passes']} passes "
        f"({config['passes'] * sun['examples']} examples): "
        + ", ".join("not reached" if h is None else str(h) for h in hits)
        + " (per seed).",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test sizes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ensemble", type=int, default=200)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.ensemble, args.passes = 1, 3, 30, 2
    config = {
        "seeds": list(range(args.seeds)),
        "epochs": args.epochs,
        "ensemble": args.ensemble,
        "batch": 100,
        "passes": args.passes,
        "sun_ensemble": 100 if not args.quick else 20,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    start = time.perf_counter()
    digits = digits_benchmark(config["seeds"], args.epochs, args.ensemble, 100, args.quick)
    sun = sunspot_benchmark(config["seeds"], args.passes, config["sun_ensemble"])
    total = time.perf_counter() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "ml_training_quick" if args.quick else "ml_training"
    text = report(config, digits, sun, total)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(
        json.dumps(
            {"config": config, "digits": digits, "sunspots": sun, "seconds": total}, indent=1
        )
    )
    print(text)


if __name__ == "__main__":
    main()
