"""Tests written to kill mutants that the behavioural unit tests let live (make mutation):
each pins down a rule of the pure policy modules that no other test states."""

from __future__ import annotations
