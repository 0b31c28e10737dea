"""Modules: what the experts of a converted model do per domain, and operations on them.

stats.py   which experts a domain routes to (fractions, weights, output norms, entropy, overlap, heatmap)
prune.py   keep the experts a domain uses (specialist models), optional brief calibration
extend.py  add expert pools trained on a new domain with the old model frozen, then L2R-style router tuning
"""
