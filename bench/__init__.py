"""Benchmarks: accuracy (does the loop pay off?), speed (does it waste the hardware?) and scale
(does pseudo-labeling a huge pool stay linear in time and bounded in memory?). See README.md."""
