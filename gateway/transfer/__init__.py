"""Transfer: the delivery worker, its preparation pipeline and the destinations."""
