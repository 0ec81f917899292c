// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AppBootInfo, IAppAuth, IERC165} from "./IAppAuth.sol";

/// @title DstackApp — k-of-n app authorisation for one Sealroom study
/// @notice A drop-in for dstack's `DstackApp` app-auth contract (same `isAppAllowed`, ERC-165 ids and
/// `ComposeHashAdded/Removed` events); its address is the study's app_id. Differences from dstack
/// (DESIGN.md §2):
/// - a fixed owner set and threshold k instead of one `Ownable` owner: anyone proposes a compose hash,
///   owners approve it (by transaction or by an EIP-712 signature anyone can relay), and at k approvals it
///   is allowed;
/// - any single owner revokes a hash, finally: it can never be approved or proposed again;
/// - per-owner consent is public (`hasApproved`): the KMS releases an owner's key only to recipes that owner
///   approved, even when others met the threshold;
/// - a privacy budget in micro-epsilon (1.5 ε = 1_500_000) that only the registered KMS signer spends, one
///   recorded release at a time;
/// - not upgradeable: dstack deploys behind a UUPS proxy, but the owner set and threshold here are fixed at
///   deployment, and a proxy would let whoever controls upgrades bypass the k-of-n rule.
contract DstackApp is IAppAuth, IERC165 {
    error NotOwner(address account);
    error UnknownComposeHash(bytes32 composeHash);
    error AlreadyProposed(bytes32 composeHash);
    error AlreadyApproved(bytes32 composeHash, address owner);
    error ComposeHashIsRevoked(bytes32 composeHash);
    error InvalidSignature();
    error SignatureExpired(uint256 deadline);
    error NotKmsSigner(address caller);
    error ComposeHashNotAllowed(bytes32 composeHash);
    error OwnerDidNotApprove(bytes32 composeHash, address owner);
    error BudgetExceeded(uint256 requested, uint256 remaining);
    error ReleaseAlreadyRecorded(bytes32 releaseId);
    error EmptyRelease();
    error InvalidThreshold();
    error DuplicateOwner(address owner);
    error ZeroAddress();

    event ComposeHashProposed(bytes32 indexed composeHash, address indexed proposer, string uri);
    event ComposeHashApproved(bytes32 indexed composeHash, address indexed owner, uint256 approvals);
    /// @dev dstack's event name and shape; emitted once, when approvals reach the threshold.
    event ComposeHashAdded(bytes32 composeHash);
    event ComposeHashRevoked(bytes32 indexed composeHash, address indexed owner);
    /// @dev dstack's event name and shape; emitted on every revocation, allowed or not, so auditors see it.
    event ComposeHashRemoved(bytes32 composeHash);
    event BudgetSpent(
        bytes32 indexed releaseId, bytes32 indexed composeHash, address[] owners, uint256 epsilon, uint256 remaining
    );

    struct ComposeHashRecord {
        bool proposed;
        bool revoked;
        string uri;
        address[] approvers; // in approval order
    }

    struct Release {
        bytes32 releaseId;
        bytes32 composeHash;
        address[] owners;
        uint256 epsilon;
        uint256 blockNumber;
    }

    // EIP-712 (https://eips.ethereum.org/EIPS/eip-712) type hashes for owner approvals by signature.
    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant APPROVE_TYPEHASH = keccak256("ApproveComposeHash(bytes32 composeHash,uint256 deadline)");
    bytes32 private constant NAME_HASH = keccak256("Sealroom DstackApp");
    bytes32 private constant VERSION_HASH = keccak256("1");
    /// @dev Largest s in the lower half of the secp256k1 order (EIP-2): higher s values are the malleable twin.
    uint256 private constant MAX_LOW_S = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes32 private constant TCB_UP_TO_DATE = keccak256("UpToDate");

    uint256 public immutable threshold;
    address public immutable kmsSigner;
    bool public immutable requireTcbUpToDate;
    uint256 public immutable epsilonBudget; // micro-epsilon
    uint256 public epsilonSpent; // micro-epsilon

    address[] private _owners;
    mapping(address => bool) public isOwner;
    mapping(bytes32 => ComposeHashRecord) private _composeHashes;
    mapping(bytes32 => mapping(address => bool)) private _approved;
    Release[] private _releases;
    mapping(bytes32 => bool) private _releaseRecorded;

    /// @param owners_ the data owners; fixed for the contract's life
    /// @param threshold_ approvals needed before a compose hash is allowed (1 <= k <= owners_.length)
    /// @param epsilonBudget_ total privacy budget of the study, micro-epsilon
    /// @param kmsSigner_ the KMS account allowed to record releases (and so spend the budget)
    /// @param requireTcbUpToDate_ refuse CVMs whose TCB status is not "UpToDate" (dstack's option)
    constructor(
        address[] memory owners_,
        uint256 threshold_,
        uint256 epsilonBudget_,
        address kmsSigner_,
        bool requireTcbUpToDate_
    ) {
        for (uint256 i = 0; i < owners_.length; i++) {
            address account = owners_[i];
            if (account == address(0)) revert ZeroAddress();
            if (isOwner[account]) revert DuplicateOwner(account);
            isOwner[account] = true;
        }
        if (threshold_ == 0 || threshold_ > owners_.length) revert InvalidThreshold();
        if (kmsSigner_ == address(0)) revert ZeroAddress();
        _owners = owners_;
        threshold = threshold_;
        epsilonBudget = epsilonBudget_;
        kmsSigner = kmsSigner_;
        requireTcbUpToDate = requireTcbUpToDate_;
    }

    modifier onlyOwner() {
        if (!isOwner[msg.sender]) revert NotOwner(msg.sender);
        _;
    }

    function owners() external view returns (address[] memory) {
        return _owners;
    }

    // ---------------------------------------------------------------- compose hashes

    /// @notice Put a compose hash (sha256 of app-compose.json) up for approval; anyone may propose.
    /// @param uri where reviewers fetch the app-compose.json bytes
    function proposeComposeHash(bytes32 composeHash, string calldata uri) external {
        ComposeHashRecord storage record = _composeHashes[composeHash];
        // A revoked hash stays proposed, so this also keeps revocation final.
        if (record.proposed) revert AlreadyProposed(composeHash);
        record.proposed = true;
        record.uri = uri;
        emit ComposeHashProposed(composeHash, msg.sender, uri);
    }

    /// @notice The calling owner approves a proposed compose hash (and consents to its data being used).
    function approveComposeHash(bytes32 composeHash) external onlyOwner {
        _approve(composeHash, msg.sender);
    }

    /// @notice Record `owner`'s approval from their EIP-712 signature over
    /// `ApproveComposeHash(bytes32 composeHash,uint256 deadline)` (see `approvalDigest`); anyone may relay it.
    /// @param signature 65 bytes r || s || v, v in {27, 28} or {0, 1}, low s only
    function approveComposeHashBySig(bytes32 composeHash, address owner, uint256 deadline, bytes calldata signature)
        external
    {
        if (deadline < block.timestamp) revert SignatureExpired(deadline);
        if (!isOwner[owner]) revert NotOwner(owner);
        if (_recoverSigner(approvalDigest(composeHash, deadline), signature) != owner) revert InvalidSignature();
        // No nonce is needed: an owner approves a hash at most once, so a replay hits AlreadyApproved.
        _approve(composeHash, owner);
    }

    /// @notice Any single owner revokes a compose hash; final — it can never be approved or proposed again.
    function revokeComposeHash(bytes32 composeHash) external onlyOwner {
        ComposeHashRecord storage record = _composeHashes[composeHash];
        if (!record.proposed) revert UnknownComposeHash(composeHash);
        if (record.revoked) revert ComposeHashIsRevoked(composeHash);
        record.revoked = true;
        emit ComposeHashRevoked(composeHash, msg.sender);
        emit ComposeHashRemoved(composeHash);
    }

    function hasApproved(bytes32 composeHash, address owner) external view returns (bool) {
        return _approved[composeHash][owner];
    }

    /// @notice Owners who approved `composeHash`, in approval order.
    function approvers(bytes32 composeHash) external view returns (address[] memory) {
        return _composeHashes[composeHash].approvers;
    }

    function composeHashState(bytes32 composeHash)
        external
        view
        returns (bool proposed, bool allowed, bool revoked, uint256 approvals, string memory uri)
    {
        ComposeHashRecord storage record = _composeHashes[composeHash];
        return (record.proposed, _isAllowed(record), record.revoked, record.approvers.length, record.uri);
    }

    /// @notice True iff the hash has at least `threshold` approvals and is not revoked (dstack's getter name).
    function allowedComposeHashes(bytes32 composeHash) external view returns (bool) {
        return _isAllowed(_composeHashes[composeHash]);
    }

    /// @notice The EIP-712 domain separator, computed from the current chain id so that a signature made
    /// for another chain (e.g. before a fork) never verifies here.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    /// @notice The digest an owner signs to approve `composeHash` until `deadline` (unix seconds):
    /// keccak256(0x1901 || DOMAIN_SEPARATOR || keccak256(abi.encode(APPROVE_TYPEHASH, composeHash, deadline))).
    function approvalDigest(bytes32 composeHash, uint256 deadline) public view returns (bytes32) {
        bytes32 structHash = keccak256(abi.encode(APPROVE_TYPEHASH, composeHash, deadline));
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
    }

    // ---------------------------------------------------------------- dstack app-auth

    /// @notice dstack's boot check, asked by the KMS (through DstackKms) before it serves keys to a CVM.
    /// Checks in order: app id, TCB status (if required), revocation, threshold.
    function isAppAllowed(AppBootInfo calldata bootInfo) external view returns (bool isAllowed, string memory reason) {
        if (bootInfo.appId != address(this)) return (false, "App id mismatch");
        if (requireTcbUpToDate && keccak256(bytes(bootInfo.tcbStatus)) != TCB_UP_TO_DATE) {
            return (false, "TCB status is not up to date");
        }
        ComposeHashRecord storage record = _composeHashes[bootInfo.composeHash];
        if (record.revoked) return (false, "Compose hash revoked");
        if (!_isAllowed(record)) return (false, "Compose hash not allowed");
        return (true, "");
    }

    function supportsInterface(bytes4 interfaceId) external pure returns (bool) {
        return interfaceId == type(IERC165).interfaceId || interfaceId == type(IAppAuth).interfaceId;
    }

    // ---------------------------------------------------------------- privacy budget

    function epsilonRemaining() public view returns (uint256) {
        return epsilonBudget - epsilonSpent;
    }

    /// @notice The KMS records that it released `owners_`' keys for `composeHash`, spending `epsilon`
    /// micro-epsilon of the study budget. Every named owner must have approved this hash themselves.
    function recordRelease(bytes32 releaseId, bytes32 composeHash, address[] calldata owners_, uint256 epsilon)
        external
    {
        if (msg.sender != kmsSigner) revert NotKmsSigner(msg.sender);
        if (owners_.length == 0 || epsilon == 0) revert EmptyRelease();
        if (_releaseRecorded[releaseId]) revert ReleaseAlreadyRecorded(releaseId);
        ComposeHashRecord storage record = _composeHashes[composeHash];
        if (record.revoked) revert ComposeHashIsRevoked(composeHash);
        if (!_isAllowed(record)) revert ComposeHashNotAllowed(composeHash);
        for (uint256 i = 0; i < owners_.length; i++) {
            // Non-owners can never have approved, so this one check covers them too.
            if (!_approved[composeHash][owners_[i]]) revert OwnerDidNotApprove(composeHash, owners_[i]);
            for (uint256 j = 0; j < i; j++) {
                if (owners_[j] == owners_[i]) revert DuplicateOwner(owners_[i]);
            }
        }
        uint256 remaining = epsilonRemaining();
        if (epsilon > remaining) revert BudgetExceeded(epsilon, remaining);

        epsilonSpent += epsilon;
        _releaseRecorded[releaseId] = true;
        _releases.push(Release(releaseId, composeHash, owners_, epsilon, block.number));
        emit BudgetSpent(releaseId, composeHash, owners_, epsilon, remaining - epsilon);
    }

    function releaseCount() external view returns (uint256) {
        return _releases.length;
    }

    /// @notice The `index`-th recorded release, oldest first (reverts with a Panic if out of range).
    function releaseAt(uint256 index)
        external
        view
        returns (bytes32 releaseId, bytes32 composeHash, address[] memory owners_, uint256 epsilon, uint256 blockNumber)
    {
        Release storage release = _releases[index];
        return (release.releaseId, release.composeHash, release.owners, release.epsilon, release.blockNumber);
    }

    // ---------------------------------------------------------------- internals

    function _isAllowed(ComposeHashRecord storage record) private view returns (bool) {
        return !record.revoked && record.approvers.length >= threshold;
    }

    function _approve(bytes32 composeHash, address owner) private {
        ComposeHashRecord storage record = _composeHashes[composeHash];
        if (!record.proposed) revert UnknownComposeHash(composeHash);
        if (record.revoked) revert ComposeHashIsRevoked(composeHash);
        if (_approved[composeHash][owner]) revert AlreadyApproved(composeHash, owner);
        _approved[composeHash][owner] = true;
        record.approvers.push(owner);
        uint256 approvals = record.approvers.length;
        emit ComposeHashApproved(composeHash, owner, approvals);
        if (approvals == threshold) emit ComposeHashAdded(composeHash);
    }

    /// @dev ecrecover with the checks it lacks: exact length, v normalised from {0,1}, low s, non-zero result.
    /// Returns address(0) for any malformed signature; the caller compares against a non-zero owner.
    function _recoverSigner(bytes32 digest, bytes calldata signature) private pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (v < 27) v += 27;
        if (v != 27 && v != 28) return address(0);
        if (uint256(s) > MAX_LOW_S) return address(0);
        return ecrecover(digest, v, r, s);
    }
}
