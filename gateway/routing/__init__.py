"""Routing: declarative rules decide where each instance goes (pure), and the study router."""
