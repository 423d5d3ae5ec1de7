"""Who is calling and what they may see: the principal behind a bearer token, its role and its project.

Which project a resource belongs to is ``projects.py``'s (the CLI uses it too, without the web stack). A token of
another project gets 404, exactly as for a missing resource, so ids cannot be probed.
"""

from __future__ import annotations

from dataclasses import dataclass

from freezeframe.adapters.service_store import Token
from freezeframe.api.problems import forbidden
from freezeframe.api.projects import JOB_KEY, PROJECT_KEY, ProjectResolver

__all__ = ["JOB_KEY", "PROJECT_KEY", "Principal", "ProjectResolver"]


@dataclass(frozen=True)
class Principal:
    token_id: str
    role: str
    project: str | None

    @classmethod
    def of(cls, token: Token) -> Principal:
        return cls(token.id, token.role, token.project)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def sees(self, project: str | None) -> bool:
        return self.is_admin or (project is not None and project == self.project)

    def require_write(self) -> None:
        if self.role == "reader":
            raise forbidden("this token has the reader role: it can look but not change anything")

    def require_admin(self) -> None:
        if not self.is_admin:
            raise forbidden("only an admin token can do this")

    def visible_projects(self) -> list[str] | None:
        """None: every project (admin)."""
        if self.is_admin:
            return None
        return [self.project] if self.project else []
