from .batch import BatchSchedule

__all__ = ["BatchSchedule"]
