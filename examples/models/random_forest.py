"""Credit scoring with a random forest (scikit-learn, converted by skl2onnx to ONNX's
TreeEnsemble operators).

The forest is trained here on synthetic applicants (make_classification with ten named
features: income, debt ratio, age, ...); there is no checkpoint to load. The model takes a
float32 [N, 10] table and returns each applicant's label (1: default risk) and the two class
probabilities.

    python examples/models/random_forest.py https://127.0.0.1:8443 --allow-simulation
"""

from __future__ import annotations

import sys
from argparse import Namespace

import numpy as np
import onnx
from _common import Example, main

FEATURES = [
    "income",
    "debt_ratio",
    "age",
    "years_employed",
    "open_credit_lines",
    "late_payments_90d",
    "revolving_utilization",
    "dependents",
    "mortgage_loans",
    "months_since_last_delinquency",
]


def build(args: Namespace) -> Example:
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    table, labels = make_classification(
        n_samples=4000,
        n_features=len(FEATURES),
        n_informative=6,
        weights=[0.85, 0.15],  # most applicants repay
        random_state=0,
    )
    table = table.astype(np.float32)
    forest = RandomForestClassifier(n_estimators=50, max_depth=8, random_state=0)
    forest.fit(table, labels)
    model = to_onnx(
        forest,
        table[:1],
        options={"zipmap": False},  # plain tensors out, not a sequence of maps
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    assert isinstance(model, onnx.ModelProto)
    applicants = table[:8]

    def describe(outputs: dict[str, np.ndarray]) -> str:
        risk = outputs["probabilities"][:, 1]
        return "default risk of 8 applicants: " + ", ".join(f"{p:.2f}" for p in risk)

    return Example("credit-random-forest", model, {"X": applicants}, describe)


if __name__ == "__main__":
    sys.exit(main(__doc__, build))
