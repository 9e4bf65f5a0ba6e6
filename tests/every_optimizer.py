"""One small-model setting of every secant optimizer, for the framework tests: builders that
take the module to train."""

import secant

EVERY_OPTIMIZER = {
    "KFAC": lambda m: secant.KFAC(m, lr=0.05, damping=0.1, factor_update_period=1,
                                  inverse_update_period=2),
    "KBFGS": lambda m: secant.KBFGS(m, lr=0.1),
    "KBFGSL": lambda m: secant.KBFGSL(m, lr=0.1, history_size=3),
    "MomentumLBFGS": lambda m: secant.MomentumLBFGS(m.parameters(), lr=0.05, update_period=2,
                                                    history_size=3),
    "Neumann": lambda m: secant.Neumann(m.parameters(), lr=0.05, burn_in_steps=2),
}
