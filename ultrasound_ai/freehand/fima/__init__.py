"""FiMA (Yan et al., MICCAI 2024) and its ablations: network (`model`), losses, training task, online
alignment (`align`) and the "fima" pose method (`method`)."""
