"""A ledger of entries written by tasks, so a test can see that a task really ran."""

from django.db import models


class Entry(models.Model):
    kind = models.CharField(max_length=50)
    amount = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount}"
