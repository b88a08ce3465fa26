from .batch import BatchSchedule, schedule_of

__all__ = ["BatchSchedule", "schedule_of"]
