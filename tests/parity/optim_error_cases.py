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
    ("adagrad", {"lr": -0.01}, ValueError, r"lr must be >= 0; got -0.01"),
    ("adagrad", {"lr_decay": -0.1}, ValueError, r"lr_decay must be >= 0; got -0.1"),
    ("adagrad", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    ("adagrad", {"initial_accumulator_value": -0.5}, ValueError, r"initial_accumulator_value must be >= 0; got -0.5"),
    ("adagrad", {"eps": -1e-10}, ValueError, r"eps must be >= 0; got -1e-10"),
    ("adagrad", {"foreach": True, "fused": True}, RuntimeError, r"`fused` and `foreach` cannot be `True` together"),
    ("adagrad", {"maximize": 1}, TypeError, r"maximize must be a bool; got 1 of type int"),
    # --- rmsprop ---
    ("rmsprop", {"lr": -0.01}, ValueError, r"lr must be >= 0; got -0.01"),
    ("rmsprop", {"eps": -1e-8}, ValueError, r"eps must be >= 0; got -1e-08"),
    ("rmsprop", {"momentum": -0.9}, ValueError, r"momentum must be >= 0; got -0.9"),
    ("rmsprop", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    ("rmsprop", {"alpha": -0.99}, ValueError, r"alpha must be >= 0; got -0.99"),
    ("rmsprop", {"centered": "yes"}, TypeError, r"centered must be a bool; got 'yes' of type str"),
    # --- adadelta ---
    ("adadelta", {"lr": -1.0}, ValueError, r"lr must be >= 0; got -1.0"),
    ("adadelta", {"rho": 1.1}, ValueError, r"rho must be in \[0, 1\]; got 1.1"),
    ("adadelta", {"rho": -0.1}, ValueError, r"rho must be in \[0, 1\]; got -0.1"),
    ("adadelta", {"eps": -1e-6}, ValueError, r"eps must be >= 0; got -1e-06"),
    ("adadelta", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    # --- adamax ---
    ("adamax", {"lr": -0.002}, ValueError, r"lr must be >= 0; got -0.002"),
    ("adamax", {"eps": -1e-8}, ValueError, r"eps must be >= 0; got -1e-08"),
    ("adamax", {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\); got 1.0"),
    ("adamax", {"betas": (0.9, 1.5)}, ValueError, r"betas\[1\] must be in \[0, 1\); got 1.5"),
    ("adamax", {"betas": (0.9,)}, ValueError, r"betas must be a pair \(a, b\); got \(0.9,\)"),
    ("adamax", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    # --- nadam ---
    ("nadam", {"lr": -0.002}, ValueError, r"lr must be >= 0; got -0.002"),
    ("nadam", {"eps": -1e-8}, ValueError, r"eps must be >= 0; got -1e-08"),
    ("nadam", {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\); got 1.0"),
    ("nadam", {"betas": (0.9, 1.5)}, ValueError, r"betas\[1\] must be in \[0, 1\); got 1.5"),
    ("nadam", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    ("nadam", {"momentum_decay": -0.004}, ValueError, r"momentum_decay must be >= 0; got -0.004"),
    # --- radam ---
    ("radam", {"lr": -0.001}, ValueError, r"lr must be >= 0; got -0.001"),
    ("radam", {"eps": -1e-8}, ValueError, r"eps must be >= 0; got -1e-08"),
    ("radam", {"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\); got -0.1"),
    ("radam", {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be in \[0, 1\); got 1.0"),
    ("radam", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    # --- sparse_adam ---
    ("sparse_adam", {"lr": 0.0}, ValueError, r"lr must be > 0; got 0.0"),
    ("sparse_adam", {"lr": -0.001}, ValueError, r"lr must be > 0; got -0.001"),
    ("sparse_adam", {"eps": 0.0}, ValueError, r"eps must be > 0; got 0.0"),
    ("sparse_adam", {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\] must be in \[0, 1\); got 1.0"),
    ("sparse_adam", {"betas": (0.9, -0.5)}, ValueError, r"betas\[1\] must be in \[0, 1\); got -0.5"),
    # --- asgd ---
    ("asgd", {"lr": -0.01}, ValueError, r"lr must be >= 0; got -0.01"),
    ("asgd", {"weight_decay": -0.1}, ValueError, r"weight_decay must be >= 0; got -0.1"),
    ("asgd", {"lambd": "1e-4"}, TypeError, r"lambd must be a real number; got '1e-4' of type str"),
    # --- rprop ---
    ("rprop", {"lr": -0.01}, ValueError, r"lr must be >= 0; got -0.01"),
    ("rprop", {"etas": (1.0, 1.2)}, ValueError, r"etas must satisfy 0 < etas\[0\] < 1 < etas\[1\]; got \(1.0, 1.2\)"),
    ("rprop", {"etas": (0.0, 1.2)}, ValueError, r"etas must satisfy 0 < etas\[0\] < 1 < etas\[1\]; got \(0.0, 1.2\)"),
    ("rprop", {"etas": (0.5, 1.0)}, ValueError, r"etas must satisfy 0 < etas\[0\] < 1 < etas\[1\]; got \(0.5, 1.0\)"),
    ("rprop", {"step_sizes": (1e-6, "50")}, TypeError, r"step_sizes\[1\] must be a real number; got '50' of type str"),
    # --- lbfgs ---
    # torch's constructor checks only lr; our ValueErrors it lacks (max_iter/max_eval/history_size
    # < 1, tolerances < 0, line_search_fn) are in tests/test_lbfgs.py, as torch accepts them here
    ("lbfgs", {"lr": -0.1}, ValueError, r"lr must be >= 0; got -0.1"),
    ("lbfgs", {"max_iter": 2.5}, TypeError, r"max_iter must be an int; got 2.5 of type float"),
    ("lbfgs", {"history_size": "10"}, TypeError, r"history_size must be an int; got '10' of type str"),
    ("lbfgs", {"tolerance_grad": "1e-7"}, TypeError, r"tolerance_grad must be a real number; got '1e-7' of type str"),
]
