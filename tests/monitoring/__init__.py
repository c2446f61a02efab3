"""Tests of edgepack.monitoring: detection power and false alarms on real models."""
