"""Model soups (Wortsman et al. 2022): the uniform soup and the greedy soup gated by a held-out score."""
