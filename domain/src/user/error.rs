//! Why a user command was refused (refusals write no event).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the user already exists")]
    AlreadyExists,
    #[error("no such user")]
    NotFound,
    #[error("no such challenge, or it is already finished")]
    ChallengeNotFound,
    #[error("the challenge has expired")]
    ChallengeExpired,
    #[error("the account is locked")]
    LockedOut,
    #[error("the resend limit of this challenge is reached")]
    ResendLimitReached,
    #[error("this method has no code to resend")]
    NothingToResend,
    #[error("that method is not available for this challenge")]
    MethodNotAvailable,
    #[error("the code does not fit the challenge's method")]
    ProofDoesNotFitChallenge,
    #[error("no such session")]
    SessionNotFound,
    #[error("this password reset link is not valid: it was used, replaced or has expired. Ask your administrator for a new one")]
    ResetLinkInvalid,
    #[error("the user has no email address to send a reset link to")]
    NoEmailForLink,
    #[error("change the email address or the phone number, one at a time: each new one is confirmed with a code sent to it")]
    OneContactAtATime,
    #[error("no such remembered device")]
    DeviceNotFound,
    #[error("your organization requires setting up an authenticator; it cannot be skipped")]
    EnrollmentRequired,
    #[error("signing in as this user is not allowed: Login As is off for the tenant, or the user is an admin")]
    LoginAsNotAllowed,
    #[error("the current password is wrong")]
    CurrentPasswordWrong,
    #[error("an authenticator app is already enrolled")]
    AlreadyEnrolled,
    #[error("no authenticator enrollment is in progress")]
    NoEnrollmentInProgress,
    #[error("exactly {expected} backup codes are issued at once")]
    WrongBackupCodeCount { expected: usize },
    #[error("the user is not locked")]
    NotLocked,
    #[error("a reason is required for this admin action")]
    ReasonRequired,
    #[error("too many wrong codes; try again in {retry_after_secs} seconds")]
    TooManyAttempts { retry_after_secs: i64 },
    #[error("confirm a current factor first (step-up)")]
    StepUpRequired,
    #[error("two-factor authentication is not available for this tenant")]
    TwoFactorUnavailable,
    #[error("an admin cannot remove the second factor from their own account this way")]
    CannotChangeOwnFactor,
    #[error("no authenticator app is enrolled")]
    NotEnrolled,
    #[error("this challenge is answered at another endpoint")]
    WrongChallengePurpose,
    #[error("only an admin or an auditor reads users' details and the audit history")]
    NotAReader,
}
