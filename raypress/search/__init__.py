"""Searchers (Ray Tune `Searcher`s) and one-shot schedules over a SearchSpace."""
