"""scikit-learn's ``n_jobs`` on shmipc's pool, with no change to the
scikit-learn code: ``import shmipc.joblib`` registers joblib's "shmipc"
backend and ``joblib.parallel_config(backend="shmipc")`` selects it, so the
cross-validation and the grid search below run their fits on a
:class:`shmipc.Pool` (arguments and results through shared memory, a killed
worker failing one batch instead of breaking the pool).

The same code then runs on joblib's default backend (loky); the scores must
be identical (every estimator has a fixed random_state), and the program
says so, with both wall times (of a first use, worker start-up included).

Run:  .venv/bin/python examples/sklearn_joblib.py   (needs scikit-learn: .venv/bin/pip install scikit-learn)
"""
from __future__ import annotations

import time

import joblib
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score

import shmipc.joblib  # noqa: F401  (registers the "shmipc" backend)


def scikit_learn_work(X, y):
    """Ordinary scikit-learn code with n_jobs: nothing here knows about shmipc."""
    forest = RandomForestClassifier(n_estimators=30, random_state=0)
    scores = cross_val_score(forest, X, y, cv=4, n_jobs=2)
    grid = GridSearchCV(LogisticRegression(max_iter=500), {"C": [0.01, 0.1, 1.0, 10.0]},
                        cv=4, n_jobs=2)
    grid.fit(X, y)
    return [round(float(s), 6) for s in scores], grid.best_params_, round(float(grid.best_score_), 6)


def main() -> None:
    X, y = make_classification(n_samples=3000, n_features=20, random_state=0)
    results = {}
    for backend in ("shmipc", "loky"):
        t = time.perf_counter()
        with joblib.parallel_config(backend=backend):
            results[backend] = scikit_learn_work(X, y)
        print(f"{backend:7} {time.perf_counter() - t:6.2f} s  cross-validation scores "
              f"{results[backend][0]}, best C {results[backend][1]['C']} "
              f"(score {results[backend][2]})")
    print("(wall times of a first use: they include starting the workers -- loky starts fresh\n"
          " interpreters that import scikit-learn again, shmipc forks by default; see\n"
          " benchmarks/bench_joblib.py for a measurement with warm pools)")
    same = results["shmipc"] == results["loky"]
    print("identical results on shmipc and loky:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
