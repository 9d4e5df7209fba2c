"""Benchmarks and checks of agl-scverse; run each script from the repository root as a module.

``accuracy/`` scores predictions (HER2+ leave-one-section-out, the synthetic slide), ``speed/`` measures time and
memory, ``checks/`` verifies one claim each (a hypergradient, a backend, an input route). Results go to
``benchmarks/results/``; ``benchmarks/results/MANIFEST.md`` maps each result file to its script, command and commit.
"""
