"""Bad hyperparameters: (optimizer, kwargs, exception, message regex).

At least one case per check torch.optim makes in the optimizer's constructor, plus our own
(device-only flags). The message must name the argument and the value received.
"""

from __future__ import annotations

ERROR_CASES: list[tuple[str, dict, type, str]] = [
    # --- shared device flags ---
    ("adam", {"capturable": True}, ValueError, r"capturable=True is a torch device feature .* got capturable=True"),
    ("adam", {"differentiable": True}, ValueError, r"differentiable=True .* allowed: False"),
    ("adam", {"foreach": True, "fused": True}, RuntimeError, r"`fused` and `foreach` cannot be `True` together"),
    ("adam", {"lr": "0.1"}, TypeError, r"lr must be a real number; got '0.1' of type str"),
    ("adam", {"lr": float("nan")}, ValueError, r"lr must not be NaN; got nan"),
    # --- sgd ---
    ("sgd", {"lr": -0.1}, ValueError, r"lr must be >= 0; got -0.1"),
    ("sgd", {"momentum": -0.5}, ValueError, r"momentum must be >= 0; got -0.5"),
    ("sgd", {"weight_decay": -1e-4}, ValueError, r"weight_decay must be >= 0; got -0.0001"),
    ("sgd", {"nesterov": True}, ValueError, r"nesterov momentum requires momentum > 0 and dampening = 0; got momentum=0, dampening=0"),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, r"nesterov .* got momentum=0.9, dampening=0.1"),
    # --- adam ---
    ("adam", {"lr": -1e-3}, ValueError, r"lr must be >= 0; got -0.001"),
    ("adam", {"eps": -1e-8}, ValueError, r"eps must be >= 0; got -1e-08"),
    ("adam", {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\); got 1.0"),
    ("adam", {"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\); got -0.1"),
    ("adam", {"betas": (0.9,)}, ValueError, r"betas must be a pair \(a, b\); got \(0.9,\)"),
    ("adam", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    ("adam", {"amsgrad": "yes"}, TypeError, r"amsgrad must be a bool; got 'yes' of type str"),
    # --- adamw ---
    ("adamw", {"lr": -1.0}, ValueError, r"lr must be >= 0; got -1.0"),
    ("adamw", {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\); got 1.0"),
    ("adamw", {"weight_decay": -0.01}, ValueError, r"weight_decay must be >= 0; got -0.01"),
    # --- adagrad ---
    # --- rmsprop ---
    # --- adadelta ---
    # --- adamax ---
    # --- nadam ---
    # --- radam ---
    # --- sparse_adam ---
    # --- asgd ---
    # --- rprop ---
    # --- lbfgs ---
]
