"""Searchers (Ray Tune `Searcher`s) and one-shot schedules over a SearchSpace; registry.py lists them."""
from .registry import ONE_SHOT, SEARCHERS, SearcherInfo, check, evaluation_budget, evolution_budget, get_searcher

__all__ = ["ONE_SHOT", "SEARCHERS", "SearcherInfo", "check", "evaluation_budget", "evolution_budget", "get_searcher"]
