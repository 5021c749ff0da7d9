"""Query/retrieve: C-FIND, C-MOVE and C-GET on the index and an upstream PACS (PS3.4 Annex C)."""
