"""Query/retrieve: C-FIND, C-MOVE and C-GET on the index, an upstream PACS and peer nodes
(PS3.4 Annex C)."""
