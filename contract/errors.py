"""The contract's one error base: a value that breaks the contract (its message says which rule)."""


class ContractError(ValueError):
    """A size, operating point or classifier output that the contract does not allow."""
